"""The processor interface.

A processor gets the task's resolved inputs, its params and a context to report progress
and ask whether the task was cancelled; it returns the output (JSON-able, with any files
written through `ctx.storage`). It knows nothing of credits, queues or the database.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol


class ProcessingError(Exception):
    """Base for failures a processor reports on purpose."""

    code = "processing_failed"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code


class PermanentError(ProcessingError):
    """The input or params cannot work (bad image, unsupported format): fail at once, refund."""

    code = "invalid_input"


class TransientError(ProcessingError):
    """Worth retrying with backoff (input fetch failed, provider busy)."""

    code = "transient_failure"


class Cancelled(Exception):
    """The task was cancelled while processing; the worker drops the result."""


@dataclass
class InputFile:
    """One resolved input: a local file with its sniffed content type."""

    path: Path
    content_type: str
    source: Any = None


@dataclass
class ProcessContext:
    progress: Callable[[int], None]
    is_cancelled: Callable[[], bool]
    storage: Any
    task_id: str
    settings: Any = None
    workdir: Path | None = None

    def check_cancelled(self) -> None:
        if self.is_cancelled():
            raise Cancelled()


class Processor(Protocol):
    def __call__(self, inputs: list[InputFile], params: dict[str, Any], ctx: ProcessContext) -> dict[str, Any]: ...
