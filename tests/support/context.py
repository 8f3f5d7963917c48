"""A ProcessContext for calling processors directly, recording progress and cancelling on cue."""

from __future__ import annotations

from pathlib import Path

from settings import Settings
from storage import LocalStorage
from worker.processors.base import ProcessContext


class Recorder:
    def __init__(self, cancel_after_progress: int | None = None):
        self.values: list[int] = []
        self.cancel_after = cancel_after_progress

    def progress(self, value: int) -> None:
        self.values.append(value)

    def is_cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.values) >= self.cancel_after


def make_ctx(tmp_path: Path, recorder: Recorder | None = None, *, task_id: str = "task-1", **settings) -> ProcessContext:
    recorder = recorder or Recorder()
    return ProcessContext(progress=recorder.progress, is_cancelled=recorder.is_cancelled,
                          storage=LocalStorage(tmp_path / "storage"), task_id=task_id,
                          settings=Settings(**settings), workdir=tmp_path / "work")
