"""The maintenance jobs as plain functions of a session factory: beat's Celery tasks
(`worker/maintenance.py`, `worker/billing.py`) and the operator's CLI (`studiox`) run the
same code. Nothing here imports the Celery app.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

import metrics

from models.base import utcnow
from models.billing import BillingContext
from models.resets import reset_due_users
from models.db import session_scope
from models.stripe_events import apply_waiting_events, cursor_position, move_cursor, store_event

log = logging.getLogger(__name__)

Sessions = sessionmaker[Session]


@dataclass
class JobReport:
    """What a job did: rows it acted on, and rows it skipped because they failed."""

    job: str
    done: int = 0
    skipped: int = 0

    def run(self, row_id, step) -> None:
        """One row in its own transaction: a row that fails is logged, counted and skipped,
        and the rest of the batch proceeds."""
        try:
            self.done += bool(step())
        except Exception:
            self.skipped += 1
            log.exception("%s: skipped %s, which failed", self.job, row_id)

    def result(self) -> dict[str, int]:
        if self.skipped:
            log.warning("%s: %d done, %d skipped", self.job, self.done, self.skipped)
        metrics.JOB_RUNS.labels(self.job, "partial" if self.skipped else "ok").inc()
        metrics.JOB_ROWS.labels(self.job, "done").inc(self.done)
        metrics.JOB_ROWS.labels(self.job, "skipped").inc(self.skipped)
        return {"done": self.done, "skipped": self.skipped}


RESET_BATCH = 5_000
RESET_PARALLEL = 2


def reset_due(sessions: Sessions, *, limit: int | None = None, batch: int = RESET_BATCH,
              parallel: int = RESET_PARALLEL) -> dict[str, int]:
    """Reset the users whose period ended (up to `limit`), a batch per transaction, until
    none is left that another transaction does not hold (those wait for the next run).

    `parallel` runners take batches at once, each on its own connection: the rows each one
    locks are skipped by the others (SKIP LOCKED), so they split the work as two beats would,
    and the database's cores are all used. A batch that fails is rolled back whole and
    logged; its runner stops, and the next run does the batch.
    """
    report = JobReport("reset")
    claim = threading.Lock()
    claimed = 0

    def runner() -> None:
        nonlocal claimed
        while True:
            with claim:
                size = batch if limit is None else min(batch, limit - claimed)
                if size <= 0:
                    return
                claimed += size
            try:
                with session_scope(sessions) as session:
                    done = reset_due_users(session, limit=size)
            except Exception:
                with claim:
                    report.skipped += 1
                log.exception("reset: a batch of up to %d users failed and was rolled back", size)
                return
            with claim:
                report.done += done
                claimed -= size - done
            if done < size:
                return

    threads = [threading.Thread(target=runner, name=f"reset-{i}") for i in range(max(1, parallel))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return report.result()


# --- Stripe -------------------------------------------------------------------------------------

CURSOR = "stripe_events"
# The first reconciliation looks back as far as Stripe retries a delivery; later ones from
# where the previous one started, less a margin for events listed late.
FIRST_LOOKBACK = timedelta(days=3)
OVERLAP = timedelta(minutes=5)


def apply_stripe_events(sessions: Sessions, ctx: BillingContext, job: str = "apply_stripe_events") -> dict[str, int]:
    """Apply stored events, a batch per transaction, until none is waiting. An event that
    fails is recorded on its row and not tried again in this run (the next reconciliation
    retries it)."""
    report = JobReport(job)
    failed: set[str] = set()
    while True:
        with session_scope(sessions) as session:
            applied, errors = apply_waiting_events(session, ctx, exclude=failed)
        report.done += sum(outcome != "duplicate" for _, _, outcome in applied)
        for _, event_type, outcome in applied:
            metrics.STRIPE_EVENTS_APPLIED.labels(event_type, outcome).inc()
        for event_id, error in errors:
            log.error("%s: applying Stripe event %s failed: %s: %s", job, event_id, type(error).__name__, error)
            failed.add(event_id)
            report.skipped += 1
        if not applied and not errors:
            return report.result()


def reconcile_stripe(sessions: Sessions, ctx: BillingContext) -> dict[str, int]:
    """Store the events Stripe has that we never received, then apply every stored event
    still unhandled (the new ones, and those whose apply failed or whose message was lost)."""
    if ctx.stripe is None:
        return {"fetched": 0, "new": 0, "done": 0, "skipped": 0}
    started = utcnow()
    with session_scope(sessions) as session:
        since = cursor_position(session, CURSOR)
    since = since - OVERLAP if since is not None else started - FIRST_LOOKBACK
    fetched = new = 0
    batch: list[dict] = []
    for event in ctx.stripe.list_events(since=since):
        fetched += 1
        batch.append(event)
        if len(batch) == 100:
            new += _store(sessions, batch)
            batch = []
    new += _store(sessions, batch)
    with session_scope(sessions) as session:
        move_cursor(session, CURSOR, started)
    if new:
        log.warning("reconcile: %d event(s) Stripe sent were never received by the webhook", new)
    return {"fetched": fetched, "new": new, **apply_stripe_events(sessions, ctx, "reconcile")}


def _store(sessions: Sessions, events: list[dict]) -> int:
    if not events:
        return 0
    with session_scope(sessions) as session:
        # Applied by the caller, in this job: no message per event.
        return sum(store_event(session, event)[0] for event in events)
