"""/api/tasks: submit, read, list, cancel; operators can fail or re-queue."""

from __future__ import annotations

import json

import falcon

import metrics

from models.errors import InvalidInput, TaskNotFound
from models.tasks import (
    UrlPolicy,
    admin_set_status,
    cancel_task,
    encode_cursor,
    get_task_of,
    list_tasks,
    submit_task,
    task_stats,
)

from . import schemas
from .context import current_user, parse_uuid
from .openapi import operation
from .serialize import media, task_out

IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key", "in": "header", "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
    "description": "A retried submission with the same key returns the same task (200, Idempotent-Replayed: true); "
                   "a different body under the same key is a 409",
}


_TASK_ID = {"task_id": "$response.body#/task/id"}
TASK_LINKS = {
    "GetTask": {"operationId": "get_api_tasks_task_id", "parameters": _TASK_ID},
    "CancelTask": {"operationId": "patch_api_tasks_task_id_cancel", "parameters": _TASK_ID},
    "GetTaskOutput": {"operationId": "get_api_tasks_task_id_output", "parameters": _TASK_ID},
}


class CreateTaskResource:
    def __init__(self, url_policy: UrlPolicy = UrlPolicy()):
        self.url_policy = url_policy

    @operation("Submit a task", body=schemas.CreateTaskBody, headers=(IDEMPOTENCY_KEY,), links={201: TASK_LINKS},
               responses={201: schemas.TaskEnvelope, 200: schemas.TaskEnvelope}, errors=(402, 403, 404, 409, 429),
               description="Checks the plan (403), the tasks in flight (429) and the available credits (402), "
                           "then queues the task. Credits are charged when a worker starts it.")
    def on_post(self, req: falcon.Request, resp: falcon.Response, body: schemas.CreateTaskBody) -> None:
        key = req.get_header("Idempotency-Key")
        if key is not None and not 1 <= len(key) <= 255:
            raise InvalidInput("Idempotency-Key must be 1 to 255 characters", code="invalid_idempotency_key")
        task, created = submit_task(req.context.session, current_user(req), body.type, body.input, body.params,
                                    idempotency_key=key, url_policy=self.url_policy)
        if created:
            resp.status = falcon.HTTP_201
            metrics.TASKS_CREATED.labels(task.type).inc()
        else:
            resp.set_header("Idempotent-Replayed", "true")
        resp.media = media(schemas.TaskEnvelope(task=task_out(task)))


# A page stops early (with a cursor for the rest) once its tasks pass this many bytes, so
# no list answer grows with what users stored in their tasks.
MAX_PAGE_BYTES = 1_048_576


class TasksResource:
    @operation("List your tasks, newest first", query=schemas.TaskListQuery, responses={200: schemas.TaskPage},
               description=f"At most `limit` tasks and about {MAX_PAGE_BYTES:,} bytes per page; "
                           "follow nextCursor for the rest.")
    def on_get(self, req, resp, query: schemas.TaskListQuery) -> None:
        tasks, next_cursor = list_tasks(req.context.session, current_user(req), status=query.status,
                                        task_type=query.type, cursor=query.cursor, limit=query.limit)
        # Each task is encoded once: to measure the page, and as the page.
        page: list[str] = []
        size = 0
        for index, task in enumerate(tasks):
            item = json.dumps(media(task_out(task)))
            size += len(item)
            if page and size > MAX_PAGE_BYTES:
                next_cursor = encode_cursor(tasks[index - 1])
                break
            page.append(item)
        resp.content_type = falcon.MEDIA_JSON
        resp.text = f'{{"tasks": [{", ".join(page)}], "nextCursor": {json.dumps(next_cursor)}}}'


class TaskStatsResource:
    @operation("Counts of your tasks and the credits they used", responses={200: schemas.TaskStats})
    def on_get(self, req, resp) -> None:
        resp.media = media(schemas.TaskStats(**task_stats(req.context.session, current_user(req))))


class TaskResource:
    @operation("Read one of your tasks (poll it for progress)", responses={200: schemas.TaskEnvelope},
               errors=(404,))
    def on_get(self, req, resp, task_id: str) -> None:
        # Polled by the frontend: one query, owner check included.
        task = get_task_of(req.context.session, req.context.identity.clerk_id,
                           parse_uuid(task_id, not_found=TaskNotFound))
        resp.media = media(schemas.TaskEnvelope(task=task_out(task)))


class CancelTaskResource:
    @operation("Cancel a task; refunds it if a worker already charged it", responses={200: schemas.TaskEnvelope},
               errors=(404, 409))
    def on_patch(self, req, resp, task_id: str) -> None:
        task = cancel_task(req.context.session, current_user(req), parse_uuid(task_id, not_found=TaskNotFound))
        if task.started_at is not None:  # it was charged: the cancel refunded it
            metrics.API_REFUNDS.inc(task.credits_used)
        resp.media = media(schemas.TaskEnvelope(task=task_out(task)))


class TaskStatusResource:
    auth = "admin"

    @operation("Fail (and refund) or re-queue a task", body=schemas.TaskStatusBody,
               responses={200: schemas.TaskEnvelope}, errors=(404, 409))
    def on_patch(self, req, resp, task_id: str, body: schemas.TaskStatusBody) -> None:
        task = admin_set_status(req.context.session, parse_uuid(task_id, not_found=TaskNotFound), body.status,
                                body.error)
        resp.media = media(schemas.TaskEnvelope(task=task_out(task)))
