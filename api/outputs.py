"""GET /api/tasks/{id}/output: the task's output file, streamed to its owner only."""

from __future__ import annotations

import logging
from typing import BinaryIO

import falcon

from models.errors import OutputNotReady, TaskNotFound
from models.tasks import OutputExpired, get_task_of, output_file_key
from tasktypes import sniff_content_type

from . import schemas
from .context import parse_uuid
from .openapi import operation
from .serialize import output_file, output_file_type
from .uploads import storage_unavailable

_FILE = {"schema": {"type": "string", "format": "binary"}}

log = logging.getLogger("studiox.api")


class TaskOutputResource:
    """Streams the file from storage through the API (S3 included) rather than redirecting to
    a presigned URL: the owner check stays on every download, the URL a client holds stays
    the same whatever the backend, and nothing outside the API ever needs the bucket."""

    def __init__(self, storage):
        self.storage = storage

    @operation("Download the output file of your completed task", errors=(404,),
               responses={200: {"image/*": _FILE, "video/mp4": _FILE, "application/octet-stream": _FILE},
                          410: schemas.ErrorBody},
               description="404 output_not_ready until the task completed with a file; 410 output_expired once "
                           "retention (RETENTION_DAYS) deleted it (the task's outputExpiredAt says when).")
    def on_get(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        # Another user's task is a 404 task_not_found, as for a missing one.
        task = get_task_of(req.context.session, req.context.identity.clerk_id,
                           parse_uuid(task_id, not_found=TaskNotFound))
        file = output_file(task) if task.status == "completed" else None
        if file is None:
            raise OutputNotReady("The task has no output file yet" if task.status != "completed"
                                 else "The task has no output file")
        if task.output_expired_at is not None:
            raise OutputExpired(f"The task's output file was deleted on {task.output_expired_at:%Y-%m-%d}, "
                                "as files are kept for a limited time; run the task again for a new one")
        # A task serves only what was written under its own prefix, so a processor's bad
        # output can never hand one user another's upload or output.
        key = output_file_key(task.id, file)
        try:
            if key is None:
                raise FileNotFoundError(file["key"])
            stream = self.storage.open(key)
        except (FileNotFoundError, ValueError):
            log.warning("task %s names an output file it cannot serve: %r", task.id, file["key"])
            raise OutputNotReady("The task's output file is not available") from None
        except Exception as exc:
            raise storage_unavailable(exc) from None
        try:
            size = self.storage.size(key)
            content_type = output_file_type(file)
            if content_type is None:
                head = stream.read(32)
                content_type = sniff_content_type(head)
                stream = _rewound(stream, head)
        except FileNotFoundError:  # deleted between the two reads
            stream.close()
            raise OutputNotReady("The task's output file is not available") from None
        except Exception as exc:
            stream.close()
            raise storage_unavailable(exc) from None
        resp.content_type = content_type
        resp.set_stream(stream, size)
        resp.downloadable_as = file.get("name") if isinstance(file.get("name"), str) else key.rsplit("/", 1)[-1]
        # Never let a browser guess another type (an output rendered as HTML on our origin).
        resp.set_header("X-Content-Type-Options", "nosniff")
        resp.cache_control = ["private", "max-age=3600"]


class _Prepended:
    """A stream that cannot seek, with the bytes already read from it put back in front."""

    def __init__(self, head: bytes, rest: BinaryIO):
        self.head, self.rest = head, rest

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.rest.read(size)
        if size is None or size < 0:
            data, self.head = self.head + self.rest.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data

    def close(self) -> None:
        self.rest.close()


def _rewound(stream: BinaryIO, head: bytes) -> BinaryIO:
    if stream.seekable():
        stream.seek(0)  # a local file keeps its file descriptor (and the server's sendfile)
        return stream
    return _Prepended(head, stream)
