"""A hosted model instead of the local processor, chosen by configuration only.

    PROCESSOR_OVERRIDES=image_analysis=worker.processors.remote:describe_image
    REMOTE_API_BASE=https://api.openai.com/v1   REMOTE_API_KEY=…   REMOTE_MODEL=gpt-4o-mini

Speaks the OpenAI-compatible chat completions API (OpenAI, Azure's /openai/v1, OpenRouter,
Together, vLLM, Ollama, LiteLLM…): one user message with the prompt and the image as a
data: URL. 429 and 5xx answers and network errors are retried here with backoff
(Retry-After honoured up to MAX_WAIT_SECONDS), then raised as TransientError so the
worker's own retries and, in the end, the refund apply. Any other 4xx is the provider
refusing this request: PermanentError carrying the provider's message, which the user
sees on the task.
"""

from __future__ import annotations

import base64
import io
import random
import time
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import requests
from PIL import Image

from .base import InputFile, PermanentError, ProcessContext, TransientError

# Formats every vision provider accepts inline; anything else, or anything large, is
# re-encoded as a JPEG no larger than MAX_SIDE (providers downscale to about that anyway).
INLINE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
MAX_INLINE_BYTES = 4 * 1024 * 1024
MAX_SIDE = 2048
# Longer waits are not spent holding a worker slot; the task is retried later instead.
MAX_WAIT_SECONDS = 30.0
MAX_PROMPT_CHARS = 2000


def _image_data_url(image: InputFile) -> tuple[str, dict[str, Any]]:
    try:
        with Image.open(image.path) as picture:
            info = {"width": picture.width, "height": picture.height, "format": picture.format}
            oversized = max(picture.size) > MAX_SIDE or image.path.stat().st_size > MAX_INLINE_BYTES
            if image.content_type in INLINE_TYPES and not oversized:
                raw, media_type = image.path.read_bytes(), image.content_type
            else:
                picture.thumbnail((MAX_SIDE, MAX_SIDE))
                buffer = io.BytesIO()
                picture.convert("RGB").save(buffer, "JPEG", quality=88)
                raw, media_type = buffer.getvalue(), "image/jpeg"
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise PermanentError(f"The input is not a readable image: {exc}", code="invalid_image") from None
    return f"data:{media_type};base64,{base64.b64encode(raw).decode('ascii')}", info


def _provider_message(resp: requests.Response, api_key: str) -> str:
    """The provider's own words: OpenAI-style {"error": {"message"}}, or whatever it sent."""
    message = ""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            message = str(error.get("message") or error.get("code") or "")
        elif isinstance(error, str):
            message = error
        elif isinstance(body.get("message"), str):
            message = body["message"]
    if not message:
        message = resp.text.strip() or resp.reason or f"HTTP {resp.status_code}"
    if api_key:
        message = message.replace(api_key, "[redacted]")
    return " ".join(message.split())[:500]


def _retry_after(resp: requests.Response) -> float | None:
    value = (resp.headers.get("Retry-After") or "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _description(data: Any) -> tuple[str, str | None]:
    try:
        choice = data["choices"][0]
        content = choice["message"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise PermanentError("The model provider's answer had no choices", code="provider_error") from None
    if isinstance(content, list):  # some providers answer with content parts
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    finish = choice.get("finish_reason")
    if not isinstance(content, str) or not content.strip():
        if finish == "content_filter":
            raise PermanentError("The model provider declined to describe this image", code="provider_refused")
        raise PermanentError("The model provider returned an empty description", code="provider_error")
    return content.strip(), finish


def _wait(seconds: float, ctx: ProcessContext) -> None:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        ctx.check_cancelled()
        time.sleep(min(left, 0.5))


def describe_image(inputs: list[InputFile], params: dict[str, Any], ctx: ProcessContext) -> dict[str, Any]:
    settings = ctx.settings
    if not settings.remote_api_base or not settings.remote_model:
        raise PermanentError("The remote model provider is not configured (REMOTE_API_BASE, REMOTE_MODEL)",
                             code="provider_not_configured")
    prompt = params.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        prompt = settings.remote_prompt
    data_url, image_info = _image_data_url(inputs[0])
    ctx.progress(10)
    body = {
        "model": settings.remote_model,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": prompt[:MAX_PROMPT_CHARS]},
            {"type": "image_url", "image_url": {"url": data_url}},
        ]}],
    }
    headers = {"Content-Type": "application/json"}
    if settings.remote_api_key:
        headers["Authorization"] = f"Bearer {settings.remote_api_key}"
    url = f"{settings.remote_api_base.rstrip('/')}/chat/completions"
    timeout = settings.remote_timeout_seconds
    attempts = max(0, settings.remote_max_retries) + 1
    problem = "The model provider could not be reached"
    with requests.Session() as http:
        for attempt in range(attempts):
            ctx.check_cancelled()
            wait = settings.remote_retry_backoff_seconds * 2 ** attempt * random.uniform(0.8, 1.2)
            try:
                resp = http.post(url, json=body, headers=headers, timeout=(min(10.0, timeout), timeout))
            except requests.Timeout:
                problem = f"The model provider did not answer within {timeout:g}s"
            except requests.RequestException as exc:
                problem = f"The model provider could not be reached: {type(exc).__name__}"
            else:
                if resp.ok:
                    try:
                        data = resp.json()
                    except ValueError:
                        raise PermanentError("The model provider's answer was not JSON",
                                             code="provider_error") from None
                    text, finish = _description(data)
                    ctx.progress(100)
                    return {
                        "description": text,
                        "model": data.get("model") or settings.remote_model,
                        "provider": urlsplit(settings.remote_api_base).hostname,
                        "finishReason": finish,
                        "usage": data.get("usage"),
                        "image": image_info,
                    }
                message = _provider_message(resp, settings.remote_api_key)
                if resp.status_code != 429 and resp.status_code < 500:
                    raise PermanentError(f"The model provider refused the request: {message}", code="provider_error")
                problem = f"The model provider is unavailable ({resp.status_code}): {message}"
                retry_after = _retry_after(resp)
                if retry_after is not None:
                    wait = retry_after
            if attempt + 1 < attempts:
                if wait > MAX_WAIT_SECONDS:
                    break
                _wait(wait, ctx)
    raise TransientError(problem, code="provider_unavailable")
