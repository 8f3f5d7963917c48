"""Logging for every process: one JSON object per line outside development (LOG_FORMAT=json,
the default there), readable lines in development (LOG_FORMAT=text).

Every line carries the context it was written in: the request id and the user's clerk id
in the API, the task id and the request id of the submission that created it in a worker
(it travels in the task message's headers). gunicorn's, Celery's and SQLAlchemy's own
lines go through the same handler, so they come out in the same format.
"""

from __future__ import annotations

import json
import logging
import os
from contextvars import ContextVar
from datetime import datetime, timezone

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
CLERK_ID: ContextVar[str | None] = ContextVar("clerk_id", default=None)
TASK_ID: ContextVar[str | None] = ContextVar("task_id", default=None)
CONTEXT = {"request_id": REQUEST_ID, "clerk_id": CLERK_ID, "task_id": TASK_ID}
# The task message header that carries the submitting request's id to the worker.
REQUEST_ID_HEADER = "studiox_request_id"

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(context)s"


def default_format(environment: str, configured: str | None = None) -> str:
    if configured:
        return configured
    return "text" if environment in ("development", "test") else "json"


class ContextFilter(logging.Filter):
    """Puts the context variables on each record (a record may also bring its own)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in CONTEXT.items():
            if getattr(record, name, None) is None:
                setattr(record, name, var.get())
        parts = [f"{key}={getattr(record, name)}" for name, key in (("request_id", "rid"), ("clerk_id", "user"),
                                                                      ("task_id", "task"))
                 if getattr(record, name, None)]
        record.context = f" [{' '.join(parts)}]" if parts else ""
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
            "process": record.process,
        }
        for name in CONTEXT:
            value = getattr(record, name, None)
            if value:
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def handler(fmt: str) -> logging.Handler:
    out = logging.StreamHandler()
    out.addFilter(ContextFilter())
    out.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    return out


def configure_logging(fmt: str, level: int = logging.INFO) -> None:
    """One handler on the root logger; every library's logger propagates to it."""
    root = logging.getLogger()
    root.handlers[:] = [handler(fmt)]
    root.setLevel(level)
    # SQLAlchemy's engine lines (statements) only when asked for, but in the same format.
    logging.getLogger("sqlalchemy.engine").setLevel(os.environ.get("SQL_LOG_LEVEL", "WARNING"))


def gunicorn_logconfig(fmt: str) -> dict:
    """gunicorn's `logconfig_dict`: its error and access loggers through our handler."""
    formatter = {"()": JsonFormatter} if fmt == "json" else {"format": TEXT_FORMAT}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": ContextFilter}},
        "formatters": {"studiox": formatter},
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "studiox", "filters": ["context"],
                                 "stream": "ext://sys.stdout"}},
        "root": {"level": "INFO", "handlers": ["console"]},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": ["console"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["console"], "propagate": False},
        },
    }
