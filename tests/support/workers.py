"""Real Celery worker processes for end-to-end tests."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from celery import Celery

ROOT = Path(__file__).resolve().parents[2]
ALL_QUEUES = ("image_analysis", "advanced_editing", "video_generation", "maintenance")


class CeleryWorker:
    def __init__(self, env: dict[str, str], *, queues=ALL_QUEUES, concurrency: int = 4, name: str | None = None,
                 log_path: Path | None = None):
        self.env, self.queues, self.concurrency = env, queues, concurrency
        self.name = name or f"test-{int(time.time() * 1000) % 10**8}"
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, celery: Celery, timeout: float = 60) -> CeleryWorker:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q", ",".join(self.queues),
             "-c", str(self.concurrency), "-n", f"{self.name}@%h", "--without-mingle", "--without-gossip",
             "-l", "info"],
            cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.wait_ready(celery, timeout)
        return self

    def wait_ready(self, celery: Celery, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}; log: {self.log_path}")
            replies = celery.control.ping(destination=[f"{self.name}@{_hostname()}"], timeout=0.5)
            if replies:
                return
        raise TimeoutError("worker did not answer a ping")

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in path.read_text().split()] if path.exists() else []

    def stop(self, timeout: float = 30) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _hostname() -> str:
    import socket

    return socket.gethostname()


def wait_for(predicate, timeout: float = 30, interval: float = 0.1, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {message}")
