"""The API as production runs it (gunicorn with gunicorn.conf.py), for tests that need real
sockets: slow clients, malformed framing, a database that goes away."""

from __future__ import annotations

import http.client
import subprocess
import sys
import time
from pathlib import Path

from devenv.embedded import free_port

ROOT = Path(__file__).resolve().parents[2]


class Gunicorn:
    def __init__(self, env: dict[str, str], *, workers: int = 1, log_path: Path | None = None):
        self.env, self.workers, self.log_path = env, workers, log_path
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> Gunicorn:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", "api.app:wsgi()",
             "-b", f"127.0.0.1:{self.port}", "-w", str(self.workers), "--graceful-timeout", "2",
             "--no-control-socket"],
            cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.process.returncode}; log: {self.log_path}")
            try:
                if self.request("GET", "/openapi.json", timeout=2)[0] == 200:
                    return self
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("gunicorn did not answer")

    def request(self, method: str, path: str, *, body: bytes | None = None, headers: dict[str, str] | None = None,
                timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
        return http_request("127.0.0.1", self.port, method, path, body=body, headers=headers, timeout=timeout)

    def stop(self) -> None:
        stop_process(self.process)


def http_request(host: str, port: int, method: str, path: str, *, body: bytes | None = None,
                 headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """One request on its own connection: (status, lower-cased headers, body)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def stop_process(process: subprocess.Popen | None) -> None:
    """SIGTERM, then SIGKILL if it is still there after 10 s."""
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
