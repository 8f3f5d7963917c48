"""Webhooks: a user's endpoints, the deliveries fanned out to them from the event log, each
attempt, and the signing secrets (Standard Webhooks: https://www.standardwebhooks.com).

The event log (`events`) is the source: a beat job reads it from a cursor and makes one
delivery per (endpoint, event) and per (task with its own webhook, event), each with the
exact body it will send on every attempt and a message id (`webhook-id`) that stays the
same across retries. Sending is the worker's (`worker/webhooks.py`); the rules of what an
attempt means (the next try, giving up, disabling an endpoint that keeps failing) are here.

Who sends a delivery: the runner that holds its row lock (`FOR UPDATE SKIP LOCKED`), for
the whole attempt, so two runners never send one delivery at once. Who fans out: one
runner at a time (a transaction-level advisory lock; another runner skips the step).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Identity,
    Index,
    Integer,
    String,
    Text,
    and_,
    any_,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, insert
from sqlalchemy.orm import Mapped, Session, mapped_column

from .base import Base, sql_in, utcnow
from .errors import DomainError, InvalidInput
from .events import EVENT_TYPES, Event
from .plans import Plan
from .admission import UrlPolicy, check_webhook_url
from .tasks import AiTask
from .users import User, lock_user

DELIVERY_STATUSES = ("pending", "delivered", "failed", "cancelled")
# A user's endpoints (not deleted) at most: each event is fanned out to each of them.
MAX_ENDPOINTS_PER_USER = 20
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
# An endpoint registered this long after an event does not receive it (the fan-out runs a
# few seconds behind the log, and clocks of processes differ a little).
REGISTRATION_SLACK = timedelta(minutes=1)


class WebhookNotFound(DomainError):
    """Webhook not found."""

    status_code = 404
    code = "webhook_not_found"


class TooManyWebhooks(DomainError):
    """Too many webhook endpoints."""

    status_code = 409
    code = "too_many_webhooks"


class WebhookEndpoint(Base):
    __tablename__ = "webhook_endpoints"
    __table_args__ = (
        CheckConstraint("cardinality(events) > 0", name="events_not_empty"),
        CheckConstraint("(disabled_at IS NULL) = (disabled_reason IS NULL)", name="disabled_with_reason"),
        Index("ix_webhook_endpoints_user_id_created_at", "user_id", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"))
    url: Mapped[str] = mapped_column(Text)
    events: Mapped[list[str]] = mapped_column(ARRAY(String(32)))
    secret: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    # The first failed attempt since the last success; NULL while deliveries succeed.
    failing_since: Mapped[datetime | None]
    disabled_at: Mapped[datetime | None]
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    # A deleted endpoint is gone for its user (404) and receives nothing; its log stays.
    deleted_at: Mapped[datetime | None]

    @property
    def status(self) -> str:
        return "deleted" if self.deleted_at else ("disabled" if self.disabled_at else "enabled")


class WebhookDelivery(Base):
    """One event to one target: an endpoint, or a task's own webhook (`task_id`)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint("(endpoint_id IS NULL) <> (task_id IS NULL)", name="one_target"),
        CheckConstraint(sql_in("status", DELIVERY_STATUSES), name="status_known"),
        CheckConstraint("(status = 'pending') = (next_attempt_at IS NOT NULL)", name="pending_has_next_attempt"),
        CheckConstraint("attempts >= 0", name="attempts_nonnegative"),
        # One delivery per target and event, whatever the fan-out re-reads.
        Index("uq_webhook_deliveries_endpoint_id_event_id", "endpoint_id", "event_id", unique=True,
              postgresql_where=text("endpoint_id IS NOT NULL")),
        Index("uq_webhook_deliveries_task_id_event_id", "task_id", "event_id", unique=True,
              postgresql_where=text("task_id IS NOT NULL")),
        # The senders' scan: what is due.
        Index("ix_webhook_deliveries_due", "next_attempt_at", postgresql_where=text("status = 'pending'")),
        # The logs, newest first.
        Index("ix_webhook_deliveries_endpoint_id_id", "endpoint_id", text("id DESC"),
              postgresql_where=text("endpoint_id IS NOT NULL")),
        Index("ix_webhook_deliveries_task_id_id", "task_id", text("id DESC"),
              postgresql_where=text("task_id IS NOT NULL")),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    # `webhook-id` is "msg_" + its hex: the same on every attempt of this delivery.
    message_id: Mapped[uuid.UUID] = mapped_column(default=uuid.uuid4, unique=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"))
    endpoint_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("webhook_endpoints.id"))
    task_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("ai_tasks.id"))
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id"))
    event_type: Mapped[str] = mapped_column(String(32))
    url: Mapped[str] = mapped_column(Text)
    # The exact bytes signed and sent on every attempt.
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="pending", server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[datetime | None]
    last_attempt_at: Mapped[datetime | None]
    delivered_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())

    @property
    def webhook_id(self) -> str:
        return f"msg_{self.message_id.hex}"


class WebhookAttempt(Base):
    __tablename__ = "webhook_attempts"
    __table_args__ = (Index("ix_webhook_attempts_delivery_id_id", "delivery_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("webhook_deliveries.id"))
    attempted_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    # The HTTP status answered, or NULL when there was no answer (`error` says why).
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    latency_ms: Mapped[int] = mapped_column(Integer)


class WebhookSigningSecret(Base):
    """A user's own signing secret, for the per-task webhooks (made on first use, then stable)."""

    __tablename__ = "webhook_signing_secrets"

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"), primary_key=True)
    secret: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())


class WebhookFanout(Base):
    """Where the fan-out got to in the event log, and the ids it has not seen yet below that.

    Event ids are taken at INSERT and committed later, so a smaller id can become visible
    after a larger one: an id skipped over is kept in `gaps` (id -> when first missed) and
    looked for again on every run until it shows up or GAP_SECONDS pass (its transaction
    rolled back)."""

    __tablename__ = "webhook_fanout"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    position: Mapped[int] = mapped_column(BigInteger)
    gaps: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict, server_default="{}")
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())


# --- secrets and signatures ---------------------------------------------------------------------

def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: v1, then the base64 HMAC-SHA256 of "{id}.{timestamp}.{body}"
    keyed with the secret's bytes (base64 after the whsec_ prefix)."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    mac = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signing_secret_of(session: Session, user_id: uuid.UUID) -> str:
    """The user's signing secret, made on first use; concurrent first uses agree on one."""
    query = select(WebhookSigningSecret.secret).where(WebhookSigningSecret.user_id == user_id)
    secret = session.scalar(query)
    if secret is None:
        session.execute(insert(WebhookSigningSecret).values(user_id=user_id, secret=new_secret(), created_at=utcnow())
                        .on_conflict_do_nothing(index_elements=[WebhookSigningSecret.user_id]))
        secret = session.scalar(query)
    return secret


# --- endpoints ------------------------------------------------------------------------------------

def _event_filter(events: Iterable[str] | None) -> list[str]:
    chosen = set(EVENT_TYPES if events is None else events)
    unknown = chosen - set(EVENT_TYPES)
    if unknown:
        raise InvalidInput(f"events: unknown event type {sorted(unknown)[0]!r}; one of {', '.join(EVENT_TYPES)}",
                           code="invalid_webhook_events")
    if not chosen:
        raise InvalidInput("events must name at least one event type", code="invalid_webhook_events")
    return [name for name in EVENT_TYPES if name in chosen]


def create_endpoint(session: Session, user: User, url: str, events: Iterable[str] | None = None, *,
                    url_policy: UrlPolicy = UrlPolicy()) -> WebhookEndpoint:
    """Register an endpoint for the user; its secret is shown to them once (by the caller)."""
    url = check_webhook_url(url, url_policy)
    chosen = _event_filter(events)
    lock_user(session, user.id)  # two registrations at once both count the other
    count = session.scalar(select(func.count()).select_from(WebhookEndpoint).where(
        WebhookEndpoint.user_id == user.id, WebhookEndpoint.deleted_at.is_(None)))
    if count >= MAX_ENDPOINTS_PER_USER:
        raise TooManyWebhooks(f"You have {count} webhook endpoints, the most allowed; delete one first")
    endpoint = WebhookEndpoint(user_id=user.id, url=url, events=chosen, secret=new_secret(), created_at=utcnow())
    session.add(endpoint)
    session.flush()
    return endpoint


def list_endpoints(session: Session, user: User) -> list[WebhookEndpoint]:
    return list(session.scalars(select(WebhookEndpoint).where(
        WebhookEndpoint.user_id == user.id, WebhookEndpoint.deleted_at.is_(None))
        .order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)))


def get_endpoint_of(session: Session, user: User, endpoint_id: uuid.UUID, *, lock: bool = False) -> WebhookEndpoint:
    """The user's endpoint; another user's, a deleted one or none is a 404 alike (invariant 6)."""
    query = select(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.user_id == user.id,
                                          WebhookEndpoint.deleted_at.is_(None))
    # NO KEY UPDATE: a fan-out inserting deliveries holds KEY SHARE on the endpoint, and need not be waited for.
    endpoint = session.scalar(query.with_for_update(key_share=True) if lock else query)
    if endpoint is None:
        raise WebhookNotFound()
    return endpoint


def delete_endpoint(session: Session, user: User, endpoint_id: uuid.UUID) -> WebhookEndpoint:
    """Delete the user's endpoint: nothing more is fanned out or sent to it (a delivery
    being sent right now finishes that attempt)."""
    endpoint = get_endpoint_of(session, user, endpoint_id, lock=True)
    endpoint.deleted_at = utcnow()
    session.flush()
    return endpoint


def _page(query, model, cursor: int | None, limit: int) -> tuple[list, int | None]:
    if cursor is not None:
        query = query.where(model.id < cursor)
    return query.order_by(model.id.desc()).limit(limit + 1)


def list_deliveries(session: Session, *, endpoint_id: uuid.UUID | None = None, task_id: uuid.UUID | None = None,
                    cursor: int | None = None, limit: int = 20
                    ) -> tuple[list[WebhookDelivery], dict[int, list[WebhookAttempt]], int | None]:
    """A target's deliveries, newest first (keyset on the id), with each one's attempts,
    and the cursor of the next page. The caller has checked the target is the user's."""
    query = select(WebhookDelivery).where(
        WebhookDelivery.endpoint_id == endpoint_id if endpoint_id is not None else WebhookDelivery.task_id == task_id)
    rows = list(session.scalars(_page(query, WebhookDelivery, cursor, limit)))
    page = rows[:limit]
    attempts: dict[int, list[WebhookAttempt]] = {row.id: [] for row in page}
    if page:
        for attempt in session.scalars(select(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(list(attempts)))
                                       .order_by(WebhookAttempt.id)):
            attempts[attempt.delivery_id].append(attempt)
    return page, attempts, page[-1].id if len(rows) > limit else None


# --- low-balance threshold -----------------------------------------------------------------------

def low_credits_threshold(session: Session, user: User) -> tuple[int, int, int | None]:
    """(effective, plan default, the user's override or None)."""
    plan_default = session.scalar(select(Plan.low_credits_threshold).where(Plan.id == user.plan_id))
    override = user.low_credits_threshold
    return (plan_default if override is None else override), plan_default, override


def set_low_credits_threshold(session: Session, user: User, threshold: int | None) -> tuple[int, int, int | None]:
    """Override the plan's threshold (None: back to the plan's; 0: never alert)."""
    if threshold is not None and threshold < 0:
        raise InvalidInput("lowCreditsThreshold must be 0 or more", code="invalid_threshold")
    user = lock_user(session, user.id)
    user.low_credits_threshold = threshold
    session.flush()
    return low_credits_threshold(session, user)


# --- fan-out: the event log into deliveries --------------------------------------------------------

_FANOUT_LOCK = text("SELECT pg_try_advisory_xact_lock(2026113006)")
FANOUT_CURSOR = "events"
# How long an event id skipped over is looked for (longer than any transaction that writes
# an event), and how far below a newly seen id missing ids are tracked at all.
GAP_SECONDS = 600
MAX_GAP_SPAN = 1000

RenderTasks = Callable[[Session, list[AiTask]], dict[uuid.UUID, dict[str, Any]]]


def fan_out_events(session: Session, render_tasks: RenderTasks, *, batch: int = 500) -> int | None:
    """Make the deliveries of up to `batch` new events (and of late ones below the cursor);
    return how many events were read, or None when another runner is fanning out.

    `render_tasks` shows tasks as the API does (the body's `data.task`); it is the caller's,
    since what the API shows is not a rule of this package."""
    if not session.scalar(_FANOUT_LOCK):
        return None
    cursor = session.get(WebhookFanout, FANOUT_CURSOR, with_for_update=True)
    if cursor is None:
        cursor = WebhookFanout(name=FANOUT_CURSOR, position=0, gaps={}, updated_at=utcnow())
        session.add(cursor)
        session.flush()
    gaps = {int(key): float(seen) for key, seen in (cursor.gaps or {}).items()}
    events = list(session.scalars(select(Event).where(Event.id > cursor.position).order_by(Event.id).limit(batch)))
    if gaps:
        events += session.scalars(select(Event).where(Event.id.in_(list(gaps)), Event.id <= cursor.position))
    now = time.time()
    expected = cursor.position + 1
    for event in events:
        gaps.pop(event.id, None)
        if event.id >= expected:
            for missing in range(max(expected, event.id - MAX_GAP_SPAN), event.id):
                gaps[missing] = now
            expected = event.id + 1
    gaps = {str(key): seen for key, seen in gaps.items() if now - seen < GAP_SECONDS}
    if not events and gaps == (cursor.gaps or {}):
        return 0  # nothing new: no write
    cursor.position, cursor.gaps, cursor.updated_at = expected - 1, gaps, utcnow()
    if events:
        _make_deliveries(session, events, render_tasks)
    session.flush()
    return len(events)


def _make_deliveries(session: Session, events: Sequence[Event], render_tasks: RenderTasks) -> int:
    ids = [event.id for event in events]
    to_endpoints = session.execute(
        select(Event.id, WebhookEndpoint.id, WebhookEndpoint.url)
        .join(WebhookEndpoint, and_(WebhookEndpoint.user_id == Event.user_id,
                                    Event.type == any_(WebhookEndpoint.events),
                                    WebhookEndpoint.deleted_at.is_(None), WebhookEndpoint.disabled_at.is_(None),
                                    WebhookEndpoint.created_at <= Event.created_at + REGISTRATION_SLACK))
        .where(Event.id.in_(ids))).all()
    to_tasks = session.execute(
        select(Event.id, AiTask.id, AiTask.webhook_url)
        .join(AiTask, and_(AiTask.id == Event.task_id, AiTask.webhook_url.is_not(None),
                           Event.type == any_(AiTask.webhook_events)))
        .where(Event.id.in_(ids))).all()
    if not to_endpoints and not to_tasks:
        return 0
    by_id = {event.id: event for event in events}
    targeted = {event_id for event_id, _, _ in (*to_endpoints, *to_tasks)}
    task_ids = {by_id[event_id].task_id for event_id in targeted if by_id[event_id].task_id is not None}
    tasks = list(session.scalars(select(AiTask).where(AiTask.id.in_(task_ids)))) if task_ids else []
    shown = render_tasks(session, tasks) if tasks else {}
    bodies = {event_id: webhook_body(by_id[event_id], shown.get(by_id[event_id].task_id)) for event_id in targeted}
    now = utcnow()
    rows = [dict(user_id=by_id[event_id].user_id, endpoint_id=endpoint_id, task_id=None, url=url)
            | {"event_id": event_id} for event_id, endpoint_id, url in to_endpoints]
    rows += [dict(user_id=by_id[event_id].user_id, endpoint_id=None, task_id=task_id, url=url)
             | {"event_id": event_id} for event_id, task_id, url in to_tasks]
    for row in rows:
        event = by_id[row["event_id"]]
        row.update(message_id=uuid.uuid4(), event_type=event.type, body=bodies[event.id], status="pending",
                   attempts=0, next_attempt_at=now, created_at=now)
    session.execute(insert(WebhookDelivery).on_conflict_do_nothing(), rows)
    return len(rows)


def webhook_body(event: Event, task: dict[str, Any] | None) -> str:
    """`{type, timestamp, data}`: the event's data, its id, and the task as the API shows it
    (task events) or the balance (credits.low, in the event's own data)."""
    data = {**(event.data or {}), "eventId": str(event.id)}
    if event.task_id is not None:
        data["taskId"] = str(event.task_id)
        if task is not None:
            data["task"] = task
    return json.dumps({"type": event.type, "timestamp": event.created_at.isoformat().replace("+00:00", "Z"),
                       "data": data}, separators=(",", ":"), ensure_ascii=False)


# --- attempts ------------------------------------------------------------------------------------

_DUE = (
    select(WebhookDelivery).where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= func.now())
    .order_by(WebhookDelivery.next_attempt_at).limit(1).with_for_update(skip_locked=True)
)


def claim_due_delivery(session: Session) -> tuple[WebhookDelivery, str] | None:
    """Lock the next due delivery that no other runner holds, with the secret to sign it;
    None when nothing is due. A delivery whose endpoint was deleted or disabled meanwhile
    is cancelled and the next one taken."""
    while True:
        delivery = session.scalar(_DUE.execution_options(populate_existing=True))
        if delivery is None:
            return None
        if delivery.task_id is not None:
            return delivery, signing_secret_of(session, delivery.user_id)
        endpoint = session.get(WebhookEndpoint, delivery.endpoint_id)
        if endpoint.deleted_at is None and endpoint.disabled_at is None:
            return delivery, endpoint.secret
        delivery.status, delivery.next_attempt_at = "cancelled", None
        session.flush()


def record_attempt(session: Session, delivery: WebhookDelivery, *, status_code: int | None, error: str | None,
                   latency_ms: int, retry_delays: Sequence[float], disable_after: float) -> str:
    """Write one attempt's outcome on the delivery this runner holds: delivered (a 2xx), the
    next try by `retry_delays` (seconds before the 2nd, 3rd, ... attempt), or failed once
    they are spent. An endpoint whose every attempt has failed for `disable_after` seconds
    since its first failure is disabled with the reason, and its pending deliveries stop."""
    now = utcnow()
    ok = status_code is not None and 200 <= status_code < 300
    session.add(WebhookAttempt(delivery_id=delivery.id, attempted_at=now, status_code=status_code,
                               error=None if ok else (error or f"HTTP {status_code}")[:2000], latency_ms=latency_ms))
    delivery.attempts += 1
    delivery.last_attempt_at = now
    endpoint = None
    if delivery.endpoint_id is not None:
        # The endpoint's failure clock is shared by its runners: each decides under its lock.
        endpoint = session.get(WebhookEndpoint, delivery.endpoint_id, with_for_update={"key_share": True},
                               populate_existing=True)
    if ok:
        delivery.status, delivery.delivered_at, delivery.next_attempt_at = "delivered", now, None
        if endpoint is not None:
            endpoint.failing_since = None
        session.flush()
        return "delivered"
    if delivery.attempts <= len(retry_delays):
        delivery.next_attempt_at = now + timedelta(seconds=retry_delays[delivery.attempts - 1])
    else:
        delivery.status, delivery.next_attempt_at = "failed", None
    if endpoint is not None:
        if endpoint.disabled_at is not None or endpoint.deleted_at is not None:
            if delivery.status == "pending":
                delivery.status, delivery.next_attempt_at = "cancelled", None
        elif endpoint.failing_since is None:
            endpoint.failing_since = now
        elif (now - endpoint.failing_since).total_seconds() >= disable_after:
            disable_endpoint(session, endpoint, now, last_error=error or f"HTTP {status_code}", holding=delivery.id)
            if delivery.status == "pending":
                delivery.status, delivery.next_attempt_at = "cancelled", None
    session.flush()
    return delivery.status


def disable_endpoint(session: Session, endpoint: WebhookEndpoint, now: datetime, *, last_error: str,
                     holding: int | None = None) -> None:
    """Disable an endpoint that kept failing, saying why, and stop its pending deliveries
    (those another runner holds right now stop when that runner records its attempt)."""
    hours = (now - endpoint.failing_since).total_seconds() / 3600
    endpoint.disabled_at = now
    endpoint.disabled_reason = (
        f"Every delivery failed for {hours:.1f} h, since {endpoint.failing_since:%Y-%m-%d %H:%M:%S} UTC; "
        f"last error: {last_error}")[:2000]
    held = (select(WebhookDelivery.id)
            .where(WebhookDelivery.endpoint_id == endpoint.id, WebhookDelivery.status == "pending",
                   WebhookDelivery.id != holding)
            .with_for_update(skip_locked=True))
    session.execute(update(WebhookDelivery).where(WebhookDelivery.id.in_(held.scalar_subquery()))
                    .values(status="cancelled", next_attempt_at=None),
                    execution_options={"synchronize_session": False})
