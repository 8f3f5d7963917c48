"""GET /api/tasks/{id}/output: the task's output file, streamed to its owner only."""

from __future__ import annotations

import logging

import falcon

from models.errors import OutputNotReady, TaskNotFound
from models.tasks import get_task_of
from tasktypes import sniff_content_type

from .context import parse_uuid
from .openapi import operation
from .serialize import output_file, output_file_type

_FILE = {"schema": {"type": "string", "format": "binary"}}

log = logging.getLogger("studiox.api")


class TaskOutputResource:
    def __init__(self, storage):
        self.storage = storage

    @operation("Download the output file of your completed task", errors=(404,),
               responses={200: {"image/*": _FILE, "video/mp4": _FILE, "application/octet-stream": _FILE}})
    def on_get(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        # Another user's task is a 404 task_not_found, as for a missing one.
        task = get_task_of(req.context.session, req.context.identity.clerk_id,
                           parse_uuid(task_id, not_found=TaskNotFound))
        file = output_file(task) if task.status == "completed" else None
        if file is None:
            raise OutputNotReady("The task has no output file yet" if task.status != "completed"
                                 else "The task has no output file")
        key = file["key"]
        # A task serves only what was written under its own prefix, so a processor's bad
        # output can never hand one user another's upload or output.
        if (not key.startswith(f"outputs/{task.id}/") or ".." in key.split("/")
                or not self.storage.exists(key)):
            log.warning("task %s names an output file it cannot serve: %r", task.id, key)
            raise OutputNotReady("The task's output file is not available")
        stream = self.storage.open(key)
        content_type = output_file_type(file)
        if content_type is None:
            content_type = sniff_content_type(stream.read(32))
            stream.seek(0)
        resp.content_type = content_type
        resp.set_stream(stream, self.storage.size(key))
        resp.downloadable_as = file.get("name") if isinstance(file.get("name"), str) else key.rsplit("/", 1)[-1]
        # Never let a browser guess another type (an output rendered as HTML on our origin).
        resp.set_header("X-Content-Type-Options", "nosniff")
        resp.cache_control = ["private", "max-age=3600"]
