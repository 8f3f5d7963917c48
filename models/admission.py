"""Admission: what a submission must pass before it becomes a pending task, and the
reservations pending tasks hold.

`submit_task` checks the request against its type's vocabulary, the inputs' owner, the plan,
the tasks in flight and the credits available after pending reservations, all under the
user's row lock; `estimate_task` answers the same questions without locking or writing;
`retry_task` submits a failed, cancelled or expired task's request again. Nothing is charged
here: a worker charges when it starts the task (`models/tasks.py`).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session

from tasktypes import TASK_TYPES, queue_for
from tasktypes.addresses import url_refusal
from tasktypes.inputs import input_sources, source_ref
from tasktypes.params import parse_params, stored_params

from .base import utcnow
from .db import enqueue_after_commit
from .events import TASK_EVENT_TYPES
from .errors import (
    IdempotencyKeyReused,
    InsufficientCredits,
    InvalidInput,
    InvalidTransition,
    PlanDoesNotAllow,
    TaskNotFound,
    TooManyTasksInFlight,
)
from .plans import get_plan, task_cost
from .tasks import IN_FLIGHT, AiTask
from .uploads import check_inputs_owned
from .users import User, lock_user


def request_fingerprint(task_type: str, input: Any, params: dict[str, Any], webhook: TaskWebhook | None = None) -> str:
    request = {"type": task_type, "input": input, "params": params}
    if webhook is not None:  # only then: the fingerprints of tasks without one stay as they were
        request["webhook"] = {"url": webhook.url, "events": list(webhook.events)}
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


_IN_FLIGHT_AND_RESERVED = (
    select(func.count(), func.coalesce(func.sum(AiTask.credits_used).filter(AiTask.status == "pending"), 0))
    .where(AiTask.user_id == bindparam("user_id"), AiTask.status.in_(IN_FLIGHT))
)


def in_flight_and_reserved(session: Session, user_id: uuid.UUID) -> tuple[int, int]:
    """The user's tasks in flight, and the credits promised to the pending ones (charged
    when a worker starts them), in one query served by the in-flight index."""
    count, reserved = session.execute(_IN_FLIGHT_AND_RESERVED, {"user_id": user_id}).one()
    return int(count), int(reserved)


@dataclass(frozen=True)
class CreditSummary:
    credits: int
    plan_credits: int
    purchased_credits: int
    reserved: int
    available: int
    next_reset_at: datetime | None


def credit_summary(session: Session, user: User) -> CreditSummary:
    _, reserved = in_flight_and_reserved(session, user.id)
    return CreditSummary(
        credits=user.credits,
        plan_credits=user.plan_credits,
        purchased_credits=user.purchased_credits,
        reserved=reserved,
        available=max(0, user.credits - reserved),
        next_reset_at=user.credit_reset_at,
    )


@dataclass(frozen=True)
class UrlPolicy:
    """Which URL inputs admission lets through (the fetcher's FETCH_ALLOW_PRIVATE and
    FETCH_ALLOWED_HOSTS); the default is the strict one."""

    allow_private: bool = False
    allowed_hosts: tuple[str, ...] = ()


# What a task's own webhook hears when the request names no events: how the task ended.
TASK_WEBHOOK_DEFAULT_EVENTS = ("task.completed", "task.failed", "task.cancelled", "task.expired")
MAX_WEBHOOK_URL_LENGTH = 2048


@dataclass(frozen=True)
class TaskWebhook:
    url: str
    events: tuple[str, ...] = TASK_WEBHOOK_DEFAULT_EVENTS


def check_webhook_url(url: Any, url_policy: UrlPolicy = UrlPolicy()) -> str:
    """A webhook target StudioX may post to: http(s), no credentials, and not a literal
    private, loopback or metadata address unless the fetch allowances say so (the same
    judgement as input URLs; names are resolved and checked again at every delivery)."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidInput("The webhook URL is required", code="invalid_webhook_url")
    url = url.strip()
    if len(url) > MAX_WEBHOOK_URL_LENGTH:
        raise InvalidInput(f"The webhook URL is longer than {MAX_WEBHOOK_URL_LENGTH} characters",
                           code="invalid_webhook_url")
    if url.split(":", 1)[0].lower() not in ("http", "https"):
        raise InvalidInput("The webhook URL must be http or https", code="invalid_webhook_url")
    refusal = url_refusal(url, allow_private=url_policy.allow_private, allowed_hosts=url_policy.allowed_hosts)
    if refusal:
        raise InvalidInput(f"The webhook URL {refusal}; StudioX does not deliver there", code="url_not_allowed")
    return url


def task_webhook(url: Any, events: Any = None, url_policy: UrlPolicy = UrlPolicy()) -> TaskWebhook | None:
    """A submission's `webhook` and `webhookEvents`, checked; None without a URL."""
    if url is None:
        if events is not None:
            raise InvalidInput("webhookEvents needs a webhook URL", code="invalid_webhook_events")
        return None
    url = check_webhook_url(url, url_policy)
    if events is None:
        return TaskWebhook(url)
    unknown = [name for name in events if name not in TASK_EVENT_TYPES]
    if not events or unknown:
        raise InvalidInput(f"webhookEvents must name task events among {', '.join(TASK_EVENT_TYPES)}",
                           code="invalid_webhook_events")
    return TaskWebhook(url, tuple(name for name in TASK_EVENT_TYPES if name in events))


# A task's input is one to twenty short sources; anything larger is not a task input.
MAX_INPUT_BYTES = 64 * 1024


@dataclass(frozen=True)
class TaskRequest:
    """A validated submission: the params as their schema read them, and what is stored."""

    params: Any
    stored_params: dict[str, Any]


def validate_task_request(task_type: Any, input: Any, params: Any, *,
                          url_policy: UrlPolicy = UrlPolicy()) -> TaskRequest:
    """The request checked against the vocabulary of its type; InvalidInput (400) naming the
    first failing field otherwise. URLs that could never be fetched (a literal private or
    metadata address, credentials) are refused here, without DNS. No database access."""
    if task_type not in TASK_TYPES:
        raise InvalidInput(f"type must be one of {', '.join(TASK_TYPES)}", code="invalid_task_type")
    if input is None:
        raise InvalidInput("input is required", code="invalid_input")
    if len(json.dumps(input)) > MAX_INPUT_BYTES:
        raise InvalidInput(f"input is larger than {MAX_INPUT_BYTES} bytes", code="invalid_input")
    try:
        sources = [source_ref(source, "input") for source in input_sources(task_type, input)]
    except ValueError as exc:
        raise InvalidInput(str(exc), code="invalid_input") from None
    for kind, ref in sources:
        refusal = url_refusal(ref, allow_private=url_policy.allow_private,
                              allowed_hosts=url_policy.allowed_hosts) if kind == "url" else None
        if refusal:
            raise InvalidInput(f"input: the URL {refusal}; it cannot be fetched", code="url_not_allowed")
    try:
        parsed = parse_params(task_type, params)
    except ValidationError as exc:
        raise InvalidInput.from_validation(exc, params, prefix="params", code="invalid_params") from None
    try:
        stored = stored_params(task_type, params, parsed)
    except ValueError as exc:
        raise InvalidInput(f"params {exc}", code="invalid_params") from None
    return TaskRequest(parsed, stored)


def submit_task(
    session: Session,
    user: User,
    task_type: str,
    input: Any,
    params: dict[str, Any] | None = None,
    *,
    idempotency_key: str | None = None,
    url_policy: UrlPolicy = UrlPolicy(),
    start_by: datetime | None = None,
    retry_of: uuid.UUID | None = None,
    webhook: TaskWebhook | None = None,
) -> tuple[AiTask, bool]:
    """Admit a task: valid request, own uploads, plan allows the type, in-flight under the
    limit, available credits cover it; then its message is sent after commit. A task not
    started by `start_by` (default: the plan's default deadline, if it has one) expires.

    Runs with the user's row locked, so concurrent submissions see each other's pending
    reservations and an Idempotency-Key retried at once finds the first row. Returns
    (task, created); nothing is charged here, the worker charges when it starts.
    """
    params = {} if params is None else params
    request = validate_task_request(task_type, input, params, url_policy=url_policy)
    cost = task_cost(task_type, request.params)
    # Spares the user a charge-and-refund for another user's (or a mistyped) upload id.
    check_inputs_owned(session, user.id, task_type, input)
    fingerprint = request_fingerprint(task_type, input, params, webhook)

    user = lock_user(session, user.id)
    if idempotency_key is not None:
        existing = session.scalar(
            select(AiTask).where(AiTask.user_id == user.id, AiTask.idempotency_key == idempotency_key)
        )
        if existing is not None:
            if existing.request_hash != fingerprint:
                raise IdempotencyKeyReused()
            return existing, False

    plan = get_plan(session, user.plan_id)
    if not plan.allows(task_type):
        raise PlanDoesNotAllow(f"The {plan.name} plan does not include {task_type}")
    in_flight, reserved = in_flight_and_reserved(session, user.id)
    if in_flight >= plan.max_concurrent_tasks:
        raise TooManyTasksInFlight(
            f"Your plan allows {plan.max_concurrent_tasks} tasks in flight; wait for one to finish"
        )
    available = user.credits - reserved
    if available < cost:
        raise InsufficientCredits(f"This task costs {cost} credits; you have {max(available, 0)} available")

    now = utcnow()
    if start_by is None and plan.default_start_by_seconds:
        start_by = now + timedelta(seconds=plan.default_start_by_seconds)
    if start_by is not None and start_by <= now:
        raise InvalidInput("startBy must be in the future", code="invalid_start_by")
    task = AiTask(user_id=user.id, type=task_type, status="pending", input=input, params=request.stored_params,
                  credits_used=cost, queue=queue_for(task_type), idempotency_key=idempotency_key,
                  request_hash=fingerprint, start_by=start_by, retry_of_id=retry_of, created_at=now,
                  webhook_url=webhook.url if webhook else None,
                  webhook_events=list(webhook.events) if webhook else None)
    session.add(task)
    session.flush()
    enqueue_after_commit(session, task.type, task.id)
    return task, True


@dataclass(frozen=True)
class Estimate:
    """What a submission would meet now, without making anything."""

    cost: int
    available: int  # credits less what pending tasks reserve
    affordable: bool
    plan_allows: bool
    in_flight: int
    max_in_flight: int

    @property
    def has_room(self) -> bool:
        return self.in_flight < self.max_in_flight

    @property
    def would_be_accepted(self) -> bool:
        return self.affordable and self.plan_allows and self.has_room


def estimate_task(session: Session, user: User, task_type: str, input: Any, params: dict[str, Any] | None = None,
                  *, url_policy: UrlPolicy = UrlPolicy()) -> Estimate:
    """The checks of `submit_task`, read without locking or writing: the same 400 for a bad
    request, and then the answers instead of the refusals."""
    params = {} if params is None else params
    request = validate_task_request(task_type, input, params, url_policy=url_policy)
    cost = task_cost(task_type, request.params)
    check_inputs_owned(session, user.id, task_type, input)
    plan = get_plan(session, user.plan_id)
    in_flight, reserved = in_flight_and_reserved(session, user.id)
    available = user.credits - reserved
    return Estimate(cost=cost, available=max(available, 0), affordable=available >= cost,
                    plan_allows=plan.allows(task_type), in_flight=in_flight, max_in_flight=plan.max_concurrent_tasks)


RETRYABLE_STATUSES = ("failed", "cancelled", "expired")


def retry_task(session: Session, user: User, task_id: uuid.UUID, *,
               url_policy: UrlPolicy = UrlPolicy()) -> AiTask:
    """A new task with the same type, input and params as the user's failed, cancelled or
    expired task, admitted and charged as any new one, and linked to it (`retry_of_id`)."""
    old = session.scalar(select(AiTask).where(AiTask.id == task_id, AiTask.user_id == user.id))
    if old is None:
        raise TaskNotFound()
    if old.status not in RETRYABLE_STATUSES:
        raise InvalidTransition(f"Only a failed, cancelled or expired task can be retried; this one is {old.status}")
    webhook = TaskWebhook(old.webhook_url, tuple(old.webhook_events)) if old.webhook_url else None
    task, _ = submit_task(session, user, old.type, old.input, dict(old.params or {}), url_policy=url_policy,
                          retry_of=old.id, webhook=webhook)
    return task
