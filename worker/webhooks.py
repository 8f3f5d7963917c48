"""Sending webhooks: the beat job that fans new events out into deliveries and posts the
due ones, signed per Standard Webhooks, through the same SSRF guard as input URLs.

Every attempt resolves the target's host and checks every address (`worker.fetch`:
private, loopback, link-local and metadata addresses are refused unless FETCH_ALLOWED_HOSTS
or FETCH_ALLOW_PRIVATE allow them; metadata never), then connects to the checked address
(no DNS rebinding). Redirects are not followed (a 3xx is a failed attempt), each attempt
has WEBHOOK_TIMEOUT_SECONDS for the connection and again for the whole exchange, and a
2xx is success.

A delivery is sent by the runner that holds its row lock for the attempt, so runs that
overlap (beat firing while a slow run still sends, two beats) never send one delivery at
once; a run killed mid-attempt leaves the delivery due, and it is sent again (the same
`webhook-id`: receivers drop what they have seen).
"""

from __future__ import annotations

import http.client
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

import metrics
from models.db import session_scope
from models.tasks import AiTask, queue_positions, retries_of
from models.webhooks import claim_due_delivery, fan_out_events, record_attempt, sign

from .fetch import REDIRECT_STATUSES, _connect, _Watchdog, checked_addresses, parse_target
from .jobs import JobReport
from .processors.base import ProcessingError

log = logging.getLogger(__name__)

USER_AGENT = "StudioX-Webhooks/1.0"
# A run stops taking new deliveries after this long (the next beat tick carries on), so one
# run never holds a maintenance worker for long behind slow endpoints.
RUN_SECONDS = 30.0
# Rounds of fan-out per run (each a transaction of up to FANOUT_BATCH events).
FANOUT_BATCH = 500
FANOUT_ROUNDS = 20


def render_tasks(session: Session, tasks: list[AiTask]) -> dict:
    """Tasks as the API shows them (`GET /api/tasks/{id}`): the webhook body promises that
    shape, so it is made by the API's own serializer, not a copy that could drift. Those
    modules are plain pydantic (no Falcon, no app)."""
    from api.serialize import media, task_out

    positions = queue_positions(session, tasks)
    retries = retries_of(session, [task.id for task in tasks])
    return {task.id: media(task_out(task, position=positions.get(task.id), retries=retries.get(task.id)))
            for task in tasks}


@dataclass(frozen=True)
class Outcome:
    status_code: int | None
    error: str | None
    latency_ms: int


def post(url: str, body: bytes, headers: dict[str, str], settings: Any) -> Outcome:
    """One attempt: POST the body to the URL under the SSRF guard; never raises."""
    started = time.monotonic()
    timeout = settings.webhook_timeout_seconds

    def outcome(status: int | None, error: str | None) -> Outcome:
        return Outcome(status, error, int((time.monotonic() - started) * 1000))

    try:
        target = parse_target(url)
        conn = _connect(target, checked_addresses(target, settings), timeout)
    except ProcessingError as exc:
        return outcome(None, f"{exc.code}: {exc}")
    watchdog = _Watchdog(conn, timeout)
    try:
        with watchdog:
            conn.request("POST", target.path, body=body, headers={
                **headers, "Content-Type": "application/json", "User-Agent": USER_AGENT, "Connection": "close"})
            resp = conn.getresponse()
            resp.read(4096)  # what a receiver says is not kept; reading a little lets it finish
            status = resp.status
        if status in REDIRECT_STATUSES:
            return outcome(status, f"HTTP {status}: redirects are not followed")
        return outcome(status, None if 200 <= status < 300 else f"HTTP {status}")
    except (OSError, http.client.HTTPException) as exc:
        if watchdog.fired or isinstance(exc, TimeoutError):
            return outcome(None, f"timeout: no answer within {timeout:g}s")
        return outcome(None, f"connection_failed: {type(exc).__name__}: {exc}"[:500])
    finally:
        conn.close()


def send_due(sessions: sessionmaker[Session], settings: Any, deadline: float, report: JobReport,
             lock: threading.Lock) -> None:
    """Send due deliveries one at a time, each in its own transaction holding its row lock
    for the attempt, until none is due or the deadline passes."""
    retry_delays: Sequence[float] = settings.webhook_retry_seconds
    while time.monotonic() < deadline:
        try:
            with session_scope(sessions) as session:
                claimed = claim_due_delivery(session)
                if claimed is None:
                    return
                delivery, secret = claimed
                message_id, url, event_type = delivery.webhook_id, delivery.url, delivery.event_type
                body = delivery.body.encode()
                timestamp = int(time.time())
                result = post(url, body, {
                    "webhook-id": message_id, "webhook-timestamp": str(timestamp),
                    "webhook-signature": sign(secret, message_id, timestamp, body),
                }, settings)
                status = record_attempt(session, delivery, status_code=result.status_code, error=result.error,
                                        latency_ms=result.latency_ms, retry_delays=retry_delays,
                                        disable_after=settings.webhook_disable_after_seconds)
        except Exception:
            with lock:
                report.skipped += 1
            log.exception("webhooks: a delivery attempt could not be recorded; it stays due")
            return
        metrics.JOB_ROWS.labels("webhook_attempts", status).inc()
        # Not the URL: endpoint URLs often carry a token of their own.
        log.info("webhook %s (%s): %s, %s", message_id, event_type, result.status_code or result.error, status)
        with lock:
            report.done += 1


def deliver_webhooks(sessions: sessionmaker[Session], settings: Any) -> dict[str, int]:
    """The beat job: fan new events out into deliveries, then send every due delivery with
    WEBHOOK_CONCURRENCY runners. Safe to run twice or at once (advisory lock for the
    fan-out, SKIP LOCKED for the sends)."""
    report = JobReport("webhooks")
    deadline = time.monotonic() + RUN_SECONDS
    for _ in range(FANOUT_ROUNDS):
        try:
            with session_scope(sessions) as session:
                read = fan_out_events(session, render_tasks, batch=FANOUT_BATCH)
        except Exception:
            report.skipped += 1
            log.exception("webhooks: fanning out events failed; the next run retries")
            break
        if not read or read < FANOUT_BATCH:
            break
    lock = threading.Lock()
    runners = [threading.Thread(target=send_due, args=(sessions, settings, deadline, report, lock),
                                name=f"webhooks-{i}") for i in range(max(1, settings.webhook_concurrency))]
    for runner in runners:
        runner.start()
    for runner in runners:
        runner.join()
    return report.result()

