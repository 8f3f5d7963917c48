"""Timed stand-in processors for pipeline tests and benchmarks (PROCESSOR_OVERRIDES).

They do real work on the real input file (read its bytes) and honour the processor
interface: progress, cancellation between steps, permanent and transient failures.
"""

from __future__ import annotations

import time
from typing import Any

from worker.processors.base import (
    InputFile,
    PermanentError,
    ProcessContext,
    TransientError,
)


def sleepy(inputs: list[InputFile], params: dict[str, Any], ctx: ProcessContext) -> dict[str, Any]:
    """Runs `params.sleep` seconds in 20 steps; `params.fail` = "permanent" | "transient"."""
    size = sum(f.path.stat().st_size for f in inputs)
    mode = params.get("fail")
    if mode == "permanent":
        raise PermanentError("This input can never work", code="bad_input_for_test")
    if mode == "transient":
        raise TransientError("The input could not be fetched right now", code="fetch_failed")
    steps = 20
    for step in range(steps):
        ctx.check_cancelled()
        time.sleep(float(params.get("sleep", 0)) / steps)
        ctx.progress(int(100 * (step + 1) / steps))
    return {"bytes": size, "steps": steps}


def dies(inputs: list[InputFile], params: dict[str, Any], ctx: ProcessContext) -> dict[str, Any]:
    """Kills its own worker process, as an out-of-memory kill would, every time."""
    import os
    import signal

    ctx.progress(10)
    os.kill(os.getpid(), signal.SIGKILL)
    return {}


def unstorable(inputs: list[InputFile], params: dict[str, Any], ctx: ProcessContext) -> dict[str, Any]:
    """Returns what a remote provider might: text PostgreSQL cannot store."""
    return {"description": "a cat\x00", "score": float("nan")}


def noop(inputs: list[InputFile], params: dict[str, Any], ctx: ProcessContext) -> dict[str, Any]:
    return {"ok": True}


OVERRIDES = ",".join(
    f"{name}=tests.support.processors:sleepy" for name in ("image_analysis", "advanced_editing", "video_generation")
)
