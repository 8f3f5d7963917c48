"""The benchmark's processor (PROCESSOR_OVERRIDES): does no media work, so the pipeline
benchmark measures the API, the queue and the task lifecycle around a processor."""

from __future__ import annotations

from typing import Any

from worker.processors.base import InputFile, ProcessContext


def noop(inputs: list[InputFile], params: dict[str, Any], ctx: ProcessContext) -> dict[str, Any]:
    return {"ok": True, "inputs": len(inputs)}


OVERRIDES = ",".join(f"{name}=bench.processors:noop" for name in ("image_analysis", "advanced_editing",
                                                                   "video_generation"))
