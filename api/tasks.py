"""/api/tasks: submit, read, list, cancel; operators can fail or re-queue."""

from __future__ import annotations

import falcon

from models.db import on_commit
from models.errors import InvalidInput, TaskNotFound
from models.params import validate_task_request
from models.tasks import (
    admin_set_status,
    cancel_task,
    get_task_of,
    list_tasks,
    submit_task,
    task_stats,
)
from models.uploads import check_inputs_owned

from .context import current_user, json_body, limit_param, parse_uuid
from .serialize import task_json


class CreateTaskResource:
    def __init__(self, queue):
        self.queue = queue

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = json_body(req)
        task_type = body.get("type")
        if not isinstance(task_type, str):
            raise InvalidInput("type is required", code="invalid_task_type")
        key = req.get_header("Idempotency-Key")
        if key is not None and not 1 <= len(key) <= 255:
            raise InvalidInput("Idempotency-Key must be 1 to 255 characters", code="invalid_idempotency_key")
        session = req.context.session
        user = current_user(req)

        def validate(task_type, input, params):
            validate_task_request(task_type, input, params)
            # Spares the user a charge-and-refund for another user's (or a mistyped) upload id.
            check_inputs_owned(session, user.id, task_type, input)

        task, created = submit_task(
            session, user, task_type, body.get("input"), {} if body.get("params") is None else body["params"],
            idempotency_key=key, validate=validate,
        )
        if created:
            task_type, task_id = task.type, task.id
            on_commit(session, lambda: self.queue.send(task_type, task_id))
            resp.status = falcon.HTTP_201
        else:
            resp.set_header("Idempotent-Replayed", "true")
        resp.media = {"task": task_json(task)}


class TasksResource:
    def on_get(self, req, resp) -> None:
        tasks, next_cursor = list_tasks(
            req.context.session, current_user(req), status=req.get_param("status"),
            task_type=req.get_param("type"), cursor=req.get_param("cursor"), limit=limit_param(req),
        )
        resp.media = {"tasks": [task_json(t) for t in tasks], "nextCursor": next_cursor}


class TaskStatsResource:
    def on_get(self, req, resp) -> None:
        resp.media = task_stats(req.context.session, current_user(req))


class TaskResource:
    def on_get(self, req, resp, task_id: str) -> None:
        # Polled by the frontend: one query, owner check included.
        task = get_task_of(req.context.session, req.context.identity.clerk_id,
                           parse_uuid(task_id, not_found=TaskNotFound))
        resp.media = {"task": task_json(task)}


class CancelTaskResource:
    def on_patch(self, req, resp, task_id: str) -> None:
        task = cancel_task(req.context.session, current_user(req), parse_uuid(task_id, not_found=TaskNotFound))
        resp.media = {"task": task_json(task)}


class TaskStatusResource:
    auth = "admin"

    def __init__(self, queue):
        self.queue = queue

    def on_patch(self, req, resp, task_id: str) -> None:
        body = json_body(req)
        status, message = body.get("status"), body.get("error")
        if not isinstance(status, str):
            raise InvalidInput("status is required", code="invalid_status")
        if message is not None and not isinstance(message, str):
            raise InvalidInput("error must be a string", code="invalid_input")
        session = req.context.session
        task = admin_set_status(session, parse_uuid(task_id, not_found=TaskNotFound), status, message)
        if task.status == "pending":
            task_type, tid = task.type, task.id
            on_commit(session, lambda: self.queue.send(task_type, tid))
        resp.media = {"task": task_json(task)}
