"""/api/tasks: submit, read, list, cancel; operators can fail or re-queue."""

from __future__ import annotations

import json
import logging
import uuid
from datetime import datetime, timedelta

import falcon
from sqlalchemy import delete
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

import metrics

from models import AiTask
from models.db import unsent_messages
from models.errors import InvalidInput, TaskNotFound
from models.base import utcnow
from models.admission import RETRYABLE_STATUSES, UrlPolicy, estimate_task, retry_task, submit_task, task_webhook
from models.tasks import (
    admin_set_status,
    cancel_task,
    encode_cursor,
    get_task_of,
    list_tasks,
    queue_positions,
    retries_of,
    task_stats,
)

from . import schemas
from .context import current_user, parse_uuid
from .errors import BrokerUnavailable
from .live import PREFER_HEADER, PREFERENCE_APPLIED, WAIT_NOTE, Waits, wait_for_task
from .openapi import operation
from .serialize import media, task_out

log = logging.getLogger("studiox.api")

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
    def __init__(self, url_policy: UrlPolicy = UrlPolicy(), waits: Waits | None = None):
        self.url_policy, self.waits = url_policy, waits

    @operation("Submit a task", body=schemas.CreateTaskBody, headers=(IDEMPOTENCY_KEY, PREFER_HEADER),
               links={201: TASK_LINKS}, response_headers={201: PREFERENCE_APPLIED, 200: {
                   **PREFERENCE_APPLIED, "Idempotent-Replayed": {
                       "description": "`true`: the task submitted earlier under this Idempotency-Key",
                       "required": False, "schema": {"type": "string", "enum": ["true"]}}}},
               responses={201: schemas.TaskEnvelope, 200: schemas.TaskEnvelope}, errors=(402, 403, 404, 409, 429),
               description="Checks the plan (403), the tasks in flight (429) and the available credits (402), "
                           "then queues the task. Credits are charged when a worker starts it." + WAIT_NOTE)
    def on_post(self, req: falcon.Request, resp: falcon.Response, body: schemas.CreateTaskBody) -> None:
        key = req.get_header("Idempotency-Key")
        if key is not None and not 1 <= len(key) <= 255:
            raise InvalidInput("Idempotency-Key must be 1 to 255 characters", code="invalid_idempotency_key")
        session = req.context.session
        webhook = task_webhook(body.webhook, body.webhook_events, self.url_policy)
        task, created = submit_task(session, current_user(req), body.type, body.input, body.params,
                                    idempotency_key=key, url_policy=self.url_policy, start_by=_deadline(body.start_by),
                                    webhook=webhook)
        _answer_created(req, resp, task, created, self.waits)


def _deadline(start_by: datetime | float | None) -> datetime | None:
    """The body's startBy as a time: seconds from now, or a time with its zone, ahead."""
    if start_by is None:
        return None
    if not isinstance(start_by, datetime):
        return utcnow() + timedelta(seconds=start_by)
    if start_by.tzinfo is None:
        raise InvalidInput("startBy must carry a time zone (e.g. 2027-01-01T12:00:00Z)", code="invalid_start_by")
    if start_by <= utcnow():
        raise InvalidInput("startBy must be in the future", code="invalid_start_by")
    return start_by


def _answer_created(req: falcon.Request, resp: falcon.Response, task: AiTask, created: bool,
                    waits: Waits | None = None) -> None:
    session = req.context.session
    if created:
        # Committed here rather than by the middleware: the message leaves at this commit,
        # and the answer depends on whether it did (see _withdraw_unsent).
        session.commit()
        if unsent_messages(session) and _withdraw_unsent(session, task.id):
            raise BrokerUnavailable(f"the message of task {task.id} could not be sent; task withdrawn")
        resp.status = falcon.HTTP_201
        metrics.TASKS_CREATED.labels(task.type).inc()
    else:
        resp.set_header("Idempotent-Replayed", "true")
    wait_for_task(req, resp, waits, task)
    # A task just made has no retries yet: only its queue position is read.
    resp.media = media(schemas.TaskEnvelope(task=task_view(session, task, new=created)))


def _withdraw_unsent(session: Session, task_id: uuid.UUID) -> bool:
    """Delete a just-committed task whose message the broker would not take, so that the
    503 the client gets means "nothing was submitted" and a retry (same Idempotency-Key or
    not) submits it afresh. A pending task holds no charge and nothing refers to it. If a
    worker has it already (the message did reach the broker) or the database cannot be
    reached, it stays: committed and pending, the lost-message sweep sends it, and the
    answer is the usual 201."""
    try:
        deleted = session.execute(
            delete(AiTask).where(AiTask.id == task_id, AiTask.status == "pending"),
            execution_options={"synchronize_session": False},
        ).rowcount
        session.commit()
    except DBAPIError:
        session.rollback()
        log.warning("could not withdraw task %s; the lost-message sweep will send it", task_id, exc_info=True)
        return False
    return deleted == 1


# A page stops early (with a cursor for the rest) once its tasks pass this many bytes, so
# no list answer grows with what users stored in their tasks.
MAX_PAGE_BYTES = 1_048_576


class EstimateTaskResource:
    def __init__(self, url_policy: UrlPolicy = UrlPolicy()):
        self.url_policy = url_policy

    @operation("What submitting this task would cost and meet now, without creating anything",
               body=schemas.CreateTaskBody, responses={200: schemas.EstimateOut}, errors=(404,),
               description="The same body as create, and the same 400 for a bad one; then the cost, the credits "
                           "available after pending tasks, whether the plan allows the type and whether the "
                           "in-flight limit leaves room.")
    def on_post(self, req: falcon.Request, resp: falcon.Response, body: schemas.CreateTaskBody) -> None:
        _deadline(body.start_by)  # refused as create would
        task_webhook(body.webhook, body.webhook_events, self.url_policy)
        found = estimate_task(req.context.session, current_user(req), body.type, body.input, body.params,
                              url_policy=self.url_policy)
        resp.media = media(schemas.EstimateOut(
            cost=found.cost, available=found.available, affordable=found.affordable, plan_allows=found.plan_allows,
            in_flight=found.in_flight, max_in_flight=found.max_in_flight, has_room=found.has_room,
            would_be_accepted=found.would_be_accepted))


class RetryTaskResource:
    def __init__(self, url_policy: UrlPolicy = UrlPolicy(), waits: Waits | None = None):
        self.url_policy, self.waits = url_policy, waits

    @operation("Retry a failed, cancelled or expired task as a new task", links={201: TASK_LINKS},
               headers=(PREFER_HEADER,), responses={201: schemas.TaskEnvelope}, errors=(402, 403, 404, 409, 429),
               response_headers={201: PREFERENCE_APPLIED},
               description="A new task with the same type, input and params, admitted and charged as any new "
                           "one; it names the old one in retryOf, and the old one lists it in retries." + WAIT_NOTE)
    def on_post(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        task = retry_task(req.context.session, current_user(req), parse_uuid(task_id, not_found=TaskNotFound),
                          url_policy=self.url_policy)
        _answer_created(req, resp, task, True, self.waits)


def task_view(session: Session, task: AiTask, *, new: bool = False) -> schemas.TaskOut:
    """One task as the API shows it: with its queue position (a query only while pending)
    and its retries (only a failed, cancelled or expired task can have any)."""
    retryable = not new and task.status in RETRYABLE_STATUSES
    return task_out(task, position=queue_positions(session, [task]).get(task.id),
                    retries=retries_of(session, [task.id]).get(task.id) if retryable else [])


class TasksResource:
    @operation("List your tasks, newest first", query=schemas.TaskListQuery, responses={200: schemas.TaskPage},
               description=f"At most `limit` tasks and about {MAX_PAGE_BYTES:,} bytes per page; "
                           "follow nextCursor for the rest.")
    def on_get(self, req, resp, query: schemas.TaskListQuery) -> None:
        session = req.context.session
        tasks, next_cursor = list_tasks(session, current_user(req), status=query.status,
                                        task_type=query.type, cursor=query.cursor, limit=query.limit)
        positions = queue_positions(session, tasks)
        retries = retries_of(session, [task.id for task in tasks if task.status in RETRYABLE_STATUSES])
        # Each task is encoded once: to measure the page, and as the page.
        page: list[str] = []
        size = 0
        for index, task in enumerate(tasks):
            item = json.dumps(media(task_out(task, position=positions.get(task.id), retries=retries.get(task.id))))
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
    def __init__(self, waits: Waits | None = None):
        self.waits = waits

    @operation("Read one of your tasks (poll it for progress)", responses={200: schemas.TaskEnvelope},
               headers=(PREFER_HEADER,), errors=(404,), response_headers={200: PREFERENCE_APPLIED},
               description="Or, rather than polling, wait for it to end with Prefer: wait, or follow it with "
                           "GET /api/tasks/{task_id}/events." + WAIT_NOTE)
    def on_get(self, req, resp, task_id: str) -> None:
        # Polled by the frontend: one query, owner check included.
        task = get_task_of(req.context.session, req.context.identity.clerk_id,
                           parse_uuid(task_id, not_found=TaskNotFound))
        wait_for_task(req, resp, self.waits, task)
        resp.media = media(schemas.TaskEnvelope(task=task_view(req.context.session, task)))


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
