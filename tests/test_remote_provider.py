"""The remote model provider against a loopback server speaking the OpenAI chat completions API."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from falcon import testing
from sqlalchemy import select

from api.app import create_app
from models import Transaction
from settings import Settings
from tests.support.builders import image_bytes
from tests.support.env import isolated_broker, worker_env
from tests.support.http import sign_up, upload_image
from tests.support.workers import CeleryWorker, wait_for
from worker.processors.base import (
    InputFile,
    PermanentError,
    ProcessContext,
    TransientError,
)
from worker.processors.remote import describe_image
from worker.queue import TaskQueue, create_celery

API_KEY = "sk-test-0123456789"
MODEL = "test-vision-1"


def image_file(path: Path, fmt="PNG", size=(24, 16)) -> InputFile:
    path.write_bytes(image_bytes(fmt, size, (220, 20, 60)))
    return InputFile(path, {"PNG": "image/png", "BMP": "image/bmp", "JPEG": "image/jpeg"}[fmt])


def completion(text="A crimson rectangle on nothing at all.") -> dict:
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 90, "completion_tokens": 8, "total_tokens": 98},
    }


def error(message: str, kind="invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "code": None}}


class Provider(ThreadingHTTPServer):
    """Answers from `script` in order, then with `default`; records every request."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), ProviderHandler)
        self.reset()

    def reset(self, *script, default=(200, completion(), {})) -> None:
        self.script, self.default, self.requests = list(script), default, []

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class ProviderHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        server: Provider = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                "at": time.monotonic()})
        status, payload, headers = server.script.pop(0) if server.script else server.default
        if status == "sleep":
            time.sleep(payload)
            status, payload, headers = 200, completion(), {}
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(scope="module")
def provider():
    server = Provider()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def context(provider: Provider, **changes) -> ProcessContext:
    settings = Settings(environment="test", remote_api_base=provider.base, remote_api_key=API_KEY,
                        remote_model=MODEL, remote_timeout_seconds=5, remote_max_retries=2,
                        remote_retry_backoff_seconds=0.01).with_(**changes)
    progress: list[int] = []
    return ProcessContext(progress=progress.append, is_cancelled=lambda: False, storage=None,
                          task_id=str(uuid.uuid4()), settings=settings)


class TestDescribeImage:
    def test_success_returns_the_description(self, provider, tmp_path):
        provider.reset()
        image = image_file(tmp_path / "in.png")
        output = describe_image([image], {}, context(provider))
        assert output["description"] == "A crimson rectangle on nothing at all."
        assert output["model"] == MODEL and output["provider"] == "127.0.0.1"
        assert output["usage"]["total_tokens"] == 98
        assert output["image"] == {"width": 24, "height": 16, "format": "PNG"}

        (request,) = provider.requests
        assert request["path"] == "/v1/chat/completions"
        assert request["headers"]["Authorization"] == f"Bearer {API_KEY}"
        assert request["body"]["model"] == MODEL
        (message,) = request["body"]["messages"]
        text, picture = message["content"]
        assert text == {"type": "text", "text": "Describe this image."}
        prefix = "data:image/png;base64,"
        assert picture["type"] == "image_url" and picture["image_url"]["url"].startswith(prefix)
        assert base64.b64decode(picture["image_url"]["url"][len(prefix):]) == image.path.read_bytes()

    def test_a_prompt_param_replaces_the_default(self, provider, tmp_path):
        provider.reset()
        describe_image([image_file(tmp_path / "in.png")], {"prompt": "What colour is it?"}, context(provider))
        assert provider.requests[0]["body"]["messages"][0]["content"][0]["text"] == "What colour is it?"

    def test_formats_providers_do_not_take_are_sent_as_jpeg(self, provider, tmp_path):
        provider.reset()
        describe_image([image_file(tmp_path / "in.bmp", "BMP")], {}, context(provider))
        url = provider.requests[0]["body"]["messages"][0]["content"][1]["image_url"]["url"]
        assert url.startswith("data:image/jpeg;base64,")

    def test_429_is_retried_after_the_time_the_provider_asks(self, provider, tmp_path):
        provider.reset((429, error("Rate limit reached", "rate_limit_error"), {"Retry-After": "0.4"}))
        output = describe_image([image_file(tmp_path / "in.png")], {}, context(provider))
        assert output["description"].startswith("A crimson")
        first, second = provider.requests
        assert second["at"] - first["at"] >= 0.35

    def test_persistent_500_becomes_a_transient_error_after_the_retries(self, provider, tmp_path):
        provider.reset(default=(500, error("The server had an error", "server_error"), {}))
        with pytest.raises(TransientError) as err:
            describe_image([image_file(tmp_path / "in.png")], {}, context(provider, remote_max_retries=2))
        assert len(provider.requests) == 3
        assert err.value.code == "provider_unavailable"
        assert "The server had an error" in err.value.message

    def test_a_long_retry_after_is_left_to_the_workers_retry(self, provider, tmp_path):
        provider.reset(default=(503, error("Overloaded"), {"Retry-After": "3600"}))
        started = time.monotonic()
        with pytest.raises(TransientError):
            describe_image([image_file(tmp_path / "in.png")], {}, context(provider))
        assert len(provider.requests) == 1 and time.monotonic() - started < 2

    def test_400_is_permanent_and_carries_the_providers_message(self, provider, tmp_path):
        provider.reset(default=(400, error("Invalid image: the image is too small to analyse"), {}))
        with pytest.raises(PermanentError) as err:
            describe_image([image_file(tmp_path / "in.png")], {}, context(provider))
        assert len(provider.requests) == 1
        assert err.value.code == "provider_error"
        assert "Invalid image: the image is too small to analyse" in err.value.message

    def test_the_api_key_never_reaches_the_user(self, provider, tmp_path):
        provider.reset(default=(401, error(f"Incorrect API key provided: {API_KEY}"), {}))
        with pytest.raises(PermanentError) as err:
            describe_image([image_file(tmp_path / "in.png")], {}, context(provider))
        assert API_KEY not in err.value.message and "[redacted]" in err.value.message

    def test_a_provider_that_does_not_answer_times_out(self, provider, tmp_path):
        provider.reset(("sleep", 2, {}), default=(500, error("down"), {}))
        with pytest.raises(TransientError) as err:
            describe_image([image_file(tmp_path / "in.png")], {},
                           context(provider, remote_timeout_seconds=0.5, remote_max_retries=0))
        assert "did not answer" in err.value.message

    def test_content_parts_answers_are_joined(self, provider, tmp_path):
        answer = completion()
        parts = [{"type": "text", "text": "Two "}, {"type": "text", "text": "parts"}]
        answer["choices"][0]["message"]["content"] = parts
        provider.reset(default=(200, answer, {}))
        assert describe_image([image_file(tmp_path / "in.png")], {}, context(provider))["description"] == "Two parts"

    def test_unconfigured_provider_is_a_clear_permanent_error(self, provider, tmp_path):
        with pytest.raises(PermanentError) as err:
            describe_image([image_file(tmp_path / "in.png")], {}, context(provider, remote_api_base=""))
        assert err.value.code == "provider_not_configured"


# --- end to end: a worker pointed at the provider by configuration only --------------

ISOLATED_REDIS_DB = 10  # a broker database no other test's worker consumes


@pytest.fixture(scope="module")
def isolated_settings(e2e_settings):
    return isolated_broker(e2e_settings, ISOLATED_REDIS_DB)


@pytest.fixture(scope="module")
def remote_worker(isolated_settings, provider, tmp_path_factory):
    env = worker_env(
        isolated_settings,
        PROCESSOR_OVERRIDES="image_analysis=worker.processors.remote:describe_image",
        REMOTE_API_BASE=provider.base, REMOTE_API_KEY=API_KEY, REMOTE_MODEL=MODEL,
        REMOTE_TIMEOUT_SECONDS="5", REMOTE_MAX_RETRIES="1", REMOTE_RETRY_BACKOFF_SECONDS="0.05",
    )
    worker = CeleryWorker(env, queues=("image_analysis",), concurrency=1, name="remote",
                          log_path=tmp_path_factory.mktemp("logs") / "remote-worker.log")
    worker.start(create_celery(isolated_settings))
    yield worker
    worker.stop()


@pytest.fixture
def customer(isolated_settings, e2e_engine, e2e_db, make_token, tmp_path):
    """A new free-plan user with one uploaded image; returns (client, headers, upload id)."""
    client = testing.TestClient(create_app(isolated_settings, engine=e2e_engine, session_factory=e2e_db,
                                           queue=TaskQueue(create_celery(isolated_settings))))
    headers, _ = sign_up(client, make_token())
    return client, headers, upload_image(client, headers, image_bytes("PNG", (32, 32)))


def run_task(client, headers, upload_id, timeout=60) -> dict:
    r = client.simulate_post("/api/tasks/create", headers=headers,
                             json={"type": "image_analysis", "input": upload_id})
    assert r.status_code == 201, r.json
    task_id = r.json["task"]["id"]
    return wait_for(lambda: (t := client.simulate_get(f"/api/tasks/{task_id}", headers=headers).json["task"])
                    ["status"] in ("completed", "failed") and t, timeout=timeout, message="task final")


def assert_refunded(client, headers, e2e_db, task: dict) -> None:
    with e2e_db() as s:
        entries = {t.type: t.amount for t in s.scalars(select(Transaction).where(
            Transaction.task_id == uuid.UUID(task["id"])))}
    assert entries == {"credit_deduction": -task["creditsUsed"], "credit_refund": task["creditsUsed"]}
    assert client.simulate_get("/api/users/credits", headers=headers).json["credits"] == 20


@pytest.mark.e2e
class TestRemoteProviderThroughAWorker:
    def test_a_configured_type_is_answered_by_the_provider(self, provider, remote_worker, customer):
        provider.reset((429, error("slow down"), {"Retry-After": "0.1"}))
        client, headers, upload_id = customer
        task = run_task(client, headers, upload_id)
        assert task["status"] == "completed", task
        assert task["output"]["description"] == "A crimson rectangle on nothing at all."
        assert len(provider.requests) == 2

    def test_persistent_500_fails_the_task_and_refunds(self, provider, remote_worker, customer, e2e_db):
        provider.reset(default=(500, error("The server had an error processing your request", "server_error"), {}))
        client, headers, upload_id = customer
        task = run_task(client, headers, upload_id, timeout=90)
        assert task["status"] == "failed", task
        assert task["errorCode"] == "provider_unavailable"
        assert "The server had an error processing your request" in task["error"]
        assert task["attempt"] > 1  # the worker retried with backoff before giving up
        assert_refunded(client, headers, e2e_db, task)

    def test_400_shows_the_providers_message_on_the_task(self, provider, remote_worker, customer, e2e_db):
        provider.reset(default=(400, error("Image format not supported by this model"), {}))
        client, headers, upload_id = customer
        task = run_task(client, headers, upload_id)
        assert task["status"] == "failed", task
        assert task["errorCode"] == "provider_error"
        assert "Image format not supported by this model" in task["error"]
        assert task["attempt"] == 1 and len(provider.requests) == 1
        assert_refunded(client, headers, e2e_db, task)
