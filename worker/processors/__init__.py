"""Processors by task type. `PROCESSOR_OVERRIDES` (type=module:function, comma-separated)
points a type at another processor: tests and benchmarks use it for timed stand-ins,
operators for a remote provider."""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any

from .base import (
    Cancelled,
    InputFile,
    PermanentError,
    ProcessContext,
    ProcessingError,
    Processor,
    TransientError,
)

from tasktypes import TASK_TYPE_SPECS

DEFAULT_PROCESSORS = {name: spec.processor for name, spec in TASK_TYPE_SPECS.items()}


def _load(path: str) -> Processor:
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


@cache
def get_processor(task_type: str, overrides: str = "") -> Processor:
    """The processor for a type; `overrides` is the raw PROCESSOR_OVERRIDES value."""
    path = parse_overrides(overrides).get(task_type) or DEFAULT_PROCESSORS[task_type]
    return _load(path)


def parse_overrides(raw: str | None) -> dict[str, str]:
    result: dict[str, Any] = {}
    for part in (raw or "").split(","):
        if "=" in part:
            name, path = part.split("=", 1)
            result[name.strip()] = path.strip()
    return result


__all__ = [
    "Cancelled", "InputFile", "PermanentError", "ProcessContext", "ProcessingError", "Processor",
    "TransientError", "get_processor", "parse_overrides",
]
