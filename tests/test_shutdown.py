"""SIGTERM to gunicorn finishes the requests in flight (the worker side is in
test_pipeline_e2e.py's TestGracefulShutdown): a client midway through its upload when the
signal arrives still gets its 201, and gunicorn then exits cleanly."""

from __future__ import annotations

import signal
import socket
import time

import pytest

from tests.support.builders import image_bytes
from tests.support.env import worker_env
from tests.support.http import bearer, sign_up
from tests.support.web import Gunicorn

pytestmark = pytest.mark.e2e


def test_sigterm_finishes_an_upload_in_flight(e2e_settings, e2e_client, make_token, tmp_path):
    token = make_token()
    sign_up(e2e_client, token)
    web = Gunicorn(worker_env(e2e_settings), workers=1, log_path=tmp_path / "gunicorn.log").start()
    try:
        body = image_bytes()
        head = (f"POST /api/uploads HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\n"
                f"Content-Length: {len(body)}\r\nAuthorization: {bearer(token)['Authorization']}\r\n\r\n")
        sock = socket.create_connection(("127.0.0.1", web.port), timeout=15)
        sock.sendall(head.encode() + body[:10])
        time.sleep(0.3)
        web.process.send_signal(signal.SIGTERM)  # mid-request
        time.sleep(0.5)
        sock.sendall(body[10:])
        answer = sock.recv(65536).decode(errors="replace")
        sock.close()
        assert answer.startswith("HTTP/1.1 201"), answer[:300]
        assert web.process.wait(15) == 0
    finally:
        web.stop()
