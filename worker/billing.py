"""Stripe's events on the `maintenance` queue: apply the stored events, and reconcile.

The webhook stores an event and, after its commit, queues `apply_stripe_events`, which
applies every stored event not yet handled, in Stripe's order. The sender coalesces that
job (`worker.queue.TaskQueue`), so a burst of deliveries costs a few messages, not one
each. A worker that dies in between (or a message that is lost) leaves events unhandled,
and the reconciliation applies them; so does an event whose apply failed. The work itself
is in `worker/jobs.py` (the CLI runs it too).
"""

from __future__ import annotations

from tasktypes import APPLY_STRIPE_EVENTS_JOB

from . import jobs, runtime
from .app import app


@app.task(name=APPLY_STRIPE_EVENTS_JOB, ignore_result=True)
def apply_stripe_events(_: str = "") -> dict[str, int]:
    return jobs.apply_stripe_events(runtime.sessions(), runtime.billing())


@app.task(name="maintenance.reconcile_stripe", ignore_result=True)
def reconcile_stripe() -> dict[str, int]:
    return jobs.reconcile_stripe(runtime.sessions(), runtime.billing())
