"""Flower, as the Procfile starts it: its login guards /metrics and /healthcheck too."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from devenv.embedded import free_port
from tests.support.env import worker_env

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def flower(e2e_settings, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("logs") / "flower.log"
    env = worker_env(e2e_settings, FLOWER_BASIC_AUTH="ops:s3cret")
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "worker.flower", "--address=127.0.0.1", f"--port={port}"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower exited; log: {log}")
        try:
            urllib.request.urlopen(base + "/healthcheck", timeout=1)
            break
        except urllib.error.HTTPError:
            break  # it answers (401 without a login)
        except OSError:
            time.sleep(0.3)
    yield base
    proc.terminate()
    proc.wait(10)


def _get(url: str, login: str | None = None) -> int:
    request = urllib.request.Request(url)
    if login:
        request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.parametrize("path", ["/metrics", "/healthcheck", "/api/workers"])
def test_every_page_needs_the_login(flower, path):
    assert _get(flower + path) == 401
    assert _get(flower + path, "ops:wrong") == 401
    assert _get(flower + path, "ops:s3cret") == 200
