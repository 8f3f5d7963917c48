"""The task-type vocabulary, in one place: the types, their queues, their default time
limits, their prices, their processors, the input formats they accept, and the schema of
their params.

No ORM and no Celery here: `celeryconfig.py`, `settings.py`, the processors, `models/` and
`api/` all read this package, and it reads none of them. A new task type is one entry in
`TASK_TYPE_SPECS` (with its params schema in `tasktypes/params.py`) plus its processor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from .formats import IMAGE_FORMATS, sniff_content_type
from .inputs import MAX_VIDEO_IMAGES
from .params import AnalysisParams, EditParams, VideoParams

MAINTENANCE_QUEUE = "maintenance"
# The maintenance job that applies the stored Stripe events not yet handled. Senders
# coalesce it (one message covers every event stored before it runs).
APPLY_STRIPE_EVENTS_JOB = "maintenance.apply_stripe_events"


@dataclass(frozen=True)
class TaskTypeSpec:
    name: str
    # The Celery queue its messages go to, and the task name the worker registers for it.
    queue: str
    # Seconds: the soft limit fails the task and refunds it; the hard one kills the child.
    # TIME_LIMIT_<TYPE>=soft,hard overrides them (read by settings.py).
    soft_time_limit: float
    hard_time_limit: float
    # "module:function" of the processor (imported by the worker only).
    processor: str
    # The schema of `params` (pydantic); its JSON Schema is what /openapi.json shows.
    params: type
    # The price list entry, in credits (models.plans.task_cost applies it).
    price: Mapping[str, Any] = field(default_factory=dict)
    # Images the task reads: (min, max) sources in `input`.
    inputs: tuple[int, int] = (1, 1)
    summary: str = ""

    @property
    def celery_task(self) -> str:
        return f"tasks.{self.name}"


TASK_TYPE_SPECS: Mapping[str, TaskTypeSpec] = MappingProxyType({
    spec.name: spec for spec in (
        TaskTypeSpec(
            name="image_analysis", queue="image_analysis", soft_time_limit=120, hard_time_limit=150,
            processor="worker.processors.image_analysis:analyse_image", params=AnalysisParams,
            price={"base": 1, "unit": "task", "description": "1 credit per image"},
            summary="Metadata, EXIF, dominant colours, sharpness, perceptual hashes, faces.",
        ),
        TaskTypeSpec(
            name="advanced_editing", queue="advanced_editing", soft_time_limit=180, hard_time_limit=210,
            processor="worker.processors.editing:edit_image", params=EditParams,
            price={"base": 2, "per_operation": 0, "unit": "task",
                   "description": "2 credits per edit chain (any number of operations)"},
            summary="An ordered list of image operations.",
        ),
        TaskTypeSpec(
            name="video_generation", queue="video_generation", soft_time_limit=900, hard_time_limit=960,
            processor="worker.processors.video:generate_video", params=VideoParams,
            price={"base": 0, "per_second": 2, "min": 4, "unit": "second",
                   "description": "2 credits per second of video, at least 4"},
            inputs=(1, MAX_VIDEO_IMAGES),
            summary="An MP4 made from one or more images, with motion and transitions.",
        ),
    )
})

TASK_TYPES: tuple[str, ...] = tuple(TASK_TYPE_SPECS)


def spec_for(task_type: str) -> TaskTypeSpec:
    return TASK_TYPE_SPECS[task_type]


def queue_for(task_type: str) -> str:
    return TASK_TYPE_SPECS[task_type].queue


__all__ = [
    "IMAGE_FORMATS", "MAINTENANCE_QUEUE", "MAX_VIDEO_IMAGES", "TASK_TYPES", "TASK_TYPE_SPECS",
    "TaskTypeSpec", "queue_for", "sniff_content_type", "spec_for",
]
