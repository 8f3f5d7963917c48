"""Stripe's events on the `maintenance` queue: apply the stored events, and reconcile.

The webhook stores an event and, after its commit, queues `apply_stripe_events`, which
applies every stored event not yet handled, in Stripe's order. The sender coalesces that
job (`worker.queue.TaskQueue`), so a burst of deliveries costs a few messages, not one
each. A worker that dies in between (or a message that is lost) leaves events unhandled,
and the reconciliation applies them; so does an event whose apply failed.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from models.base import utcnow
from models.db import session_scope
from models.stripe_events import apply_waiting_events, cursor_position, move_cursor, store_event
from tasktypes import APPLY_STRIPE_EVENTS_JOB

from . import runtime
from .app import app
from .maintenance import JobReport

log = logging.getLogger(__name__)

CURSOR = "stripe_events"
# The first reconciliation looks back as far as Stripe retries a delivery; later ones from
# where the previous one started, less a margin for events listed late.
FIRST_LOOKBACK = timedelta(days=3)
OVERLAP = timedelta(minutes=5)


@app.task(name=APPLY_STRIPE_EVENTS_JOB, ignore_result=True)
def apply_stripe_events(_: str = "") -> dict[str, int]:
    return apply_waiting(JobReport("apply_stripe_events"))


def apply_waiting(report: JobReport) -> dict[str, int]:
    """Apply stored events, a batch per transaction, until none is waiting. An event that
    fails is recorded on its row and not tried again in this run (the next reconciliation
    retries it)."""
    failed: set[str] = set()
    while True:
        with session_scope(runtime.sessions()) as session:
            applied, errors = apply_waiting_events(session, runtime.billing(), exclude=failed)
        report.done += sum(outcome != "duplicate" for _, outcome in applied)
        for event_id, error in errors:
            log.error("%s: applying Stripe event %s failed: %s: %s", report.job, event_id, type(error).__name__, error)
            failed.add(event_id)
            report.skipped += 1
        if not applied and not errors:
            return report.result()


@app.task(name="maintenance.reconcile_stripe", ignore_result=True)
def reconcile_stripe() -> dict[str, int]:
    """Store the events Stripe has that we never received, then apply every stored event
    still unhandled (the new ones, and those whose apply failed or whose message was lost)."""
    stripe = runtime.billing().stripe
    if stripe is None:
        return {"fetched": 0, "new": 0, "done": 0, "skipped": 0}
    started = utcnow()
    with session_scope(runtime.sessions()) as session:
        since = cursor_position(session, CURSOR)
    since = since - OVERLAP if since is not None else started - FIRST_LOOKBACK
    fetched = new = 0
    batch: list[dict] = []
    for event in stripe.list_events(since=since):
        fetched += 1
        batch.append(event)
        if len(batch) == 100:
            new += _store(batch)
            batch = []
    new += _store(batch)
    with session_scope(runtime.sessions()) as session:
        move_cursor(session, CURSOR, started)
    if new:
        log.warning("reconcile: %d event(s) Stripe sent were never received by the webhook", new)
    return {"fetched": fetched, "new": new, **apply_waiting(JobReport("reconcile"))}


def _store(events: list[dict]) -> int:
    if not events:
        return 0
    with session_scope(runtime.sessions()) as session:
        # Applied below, in this job: no message per event.
        return sum(store_event(session, event)[0] for event in events)
