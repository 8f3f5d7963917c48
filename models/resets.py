"""Monthly resets of the plan bucket, set-based: a batch of due users in one statement.

A user is due when their `credit_reset_at` has passed and no Stripe subscription serves
them (Stripe's paid invoices start those periods, models/subscriptions.py). A reset
expires what is left of the plan bucket (`credit_expiry`) and grants the plan's monthly
credits (`monthly_reset`), both ledger rows carrying the period (the date the period
ended), and moves `credit_reset_at` on to the next occurrence of the user's anchor day.

One statement does a whole batch: it takes the due rows with `FOR UPDATE SKIP LOCKED` (two
beats, or a run that overlaps the next tick, split the work instead of waiting on or
doubling it; a user whose row another transaction holds is left for the next run), writes
both ledger rows of every user and moves their buckets and dates. The unique (user, type,
period) key stays the guard of invariant 5; a user whose period was already reset (which
only a subscription ending on the day of a reset can cause) gets the date moved and no
second reset. A batch is one transaction: killed half-way, it leaves nothing, and the next
run does it.
"""

from __future__ import annotations

import calendar
import uuid
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.orm import Session

from .base import utcnow
from .users import User

# The next occurrence of the anchor day after :now, at the reset's time of day: in :now's
# month if still ahead, else in the month after. A day past a month's end is its last day.
_NEXT_RESET = """
    (SELECT min(c) FROM (
        SELECT m + make_interval(days => least(d.day, extract(day FROM m + interval '1 month - 1 day')::int) - 1)
                 + (d.reset_local - date_trunc('day', d.reset_local)) AS c
        FROM (VALUES (date_trunc('month', n.now_local)),
                     (date_trunc('month', n.now_local) + interval '1 month')) AS months(m)
    ) AS candidates WHERE c > n.now_local) AT TIME ZONE 'UTC'
"""

_RESET_BATCH = f"""
WITH n AS (SELECT CAST(:now AS timestamptz) AS now, CAST(:now AS timestamptz) AT TIME ZONE 'UTC' AS now_local),
due AS (
    SELECT u.id, u.plan_credits, u.purchased_credits, p.monthly_credits, p.name AS plan_name,
           (u.credit_reset_at AT TIME ZONE 'UTC')::date AS period,
           u.credit_reset_at AT TIME ZONE 'UTC' AS reset_local,
           coalesce(u.credit_reset_day, extract(day FROM u.credit_reset_at AT TIME ZONE 'UTC')::int) AS day
    FROM users u JOIN plans p ON p.id = u.plan_id, n
    WHERE u.credit_reset_at <= n.now AND u.stripe_subscription_id IS NULL {{only}}
    ORDER BY u.credit_reset_at
    LIMIT :limit
    FOR UPDATE OF u SKIP LOCKED
),
d AS (
    SELECT due.*, NOT EXISTS (
        SELECT 1 FROM transactions t
        WHERE t.user_id = due.id AND t.type = 'monthly_reset' AND t.period = due.period
          AND t.stripe_object_id IS NULL) AS fresh
    FROM due
),
moved AS (
    UPDATE users u
    SET plan_credits = CASE WHEN d.fresh THEN d.monthly_credits ELSE u.plan_credits END,
        credit_reset_day = d.day,
        credit_reset_at = {_NEXT_RESET}
    FROM d, n
    WHERE u.id = d.id
    RETURNING u.id
),
entries AS (
    INSERT INTO transactions (user_id, amount, plan_delta, purchased_delta, bucket, balance_after, type, period,
                              description, created_at)
    SELECT d.id, e.amount, e.amount, 0, 'plan', e.balance_after, e.type, d.period, e.description, n.now
    FROM d CROSS JOIN n CROSS JOIN LATERAL (VALUES
        (1, 'credit_expiry', -d.plan_credits, d.purchased_credits, 'Unused plan credits expired'),
        (2, 'monthly_reset', d.monthly_credits, d.purchased_credits + d.monthly_credits,
         'Monthly credits for the ' || d.plan_name || ' plan')
    ) AS e(seq, type, amount, balance_after, description)
    WHERE d.fresh AND e.amount <> 0
    ORDER BY d.id, e.seq
)
SELECT count(*) FROM moved
"""
_RESET_ANY = text(_RESET_BATCH.format(only=""))
_RESET_ONE = text(_RESET_BATCH.format(only="AND u.id = :user_id"))


def reset_due_users(session: Session, *, limit: int, now: datetime | None = None) -> int:
    """Reset up to `limit` due users whose rows no other transaction holds; return how many.
    The caller commits (one batch, one transaction)."""
    return session.execute(_RESET_ANY, {"now": now or utcnow(), "limit": limit}).scalar_one()


def reset_plan_credits(session: Session, user_id: uuid.UUID, now: datetime | None = None) -> bool:
    """Reset one user if due, by the same statement. False when not due, when a Stripe
    subscription serves them, or when another transaction is resetting them right now."""
    session.flush()
    reset = session.execute(_RESET_ONE, {"now": now or utcnow(), "limit": 1, "user_id": user_id}).scalar_one()
    session.expire_all()  # the user's row moved under the session
    return bool(reset)


def add_months(moment: datetime, months: int) -> datetime:
    """The same day `months` later, or the last day of that month when it is shorter."""
    month_index = moment.month - 1 + months
    year, month = moment.year + month_index // 12, month_index % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def anchor_resets(user: User, first: datetime, *, day: int | None = None) -> None:
    """Set the user's next reset to `first`, anchored from then on on `day` (default: the
    day of `first`), e.g. a sign-up on the 31st resets on the last day of shorter months."""
    user.credit_reset_at = first
    user.credit_reset_day = day or first.day


def start_monthly_resets(user: User, now: datetime | None = None) -> None:
    """Monthly resets from `now` on: the first a month later, anchored on today's day."""
    now = now or utcnow()
    anchor_resets(user, add_months(now, 1), day=now.day)
