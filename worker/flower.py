"""Flower as the Procfile runs it: `python -m worker.flower [flower options]`.

Flower's basic auth guards its pages and API but not `/metrics` and `/healthcheck`, which
name every worker and task and count their runs; here they require the same login.
"""

from __future__ import annotations

import sys

import tornado.web
from flower.views import monitor


def require_login_everywhere() -> None:
    for handler in (monitor.Metrics, monitor.Healthcheck):
        if not getattr(handler.get, "__wrapped__", None):
            handler.get = tornado.web.authenticated(handler.get)


def main(argv: list[str]) -> None:
    from celery.bin.celery import main as celery_main

    require_login_everywhere()
    sys.argv = ["celery", "-A", "worker.app", "flower", *argv]
    celery_main()


if __name__ == "__main__":
    main(sys.argv[1:])
