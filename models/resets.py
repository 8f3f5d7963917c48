"""Monthly resets of the plan bucket, set-based: a batch of due users in two statements.

A user is due when their `credit_reset_at` has passed and no Stripe subscription serves
them (Stripe's paid invoices start those periods, models/subscriptions.py). A reset
expires what is left of the plan bucket (`credit_expiry`) and grants the plan's monthly
credits (`monthly_reset`), both ledger rows carrying the period (the date the period
ended), and moves `credit_reset_at` on to the next occurrence of the user's anchor day.

A batch is two statements: one takes the due rows with `FOR UPDATE SKIP LOCKED` (two beats,
or a run that overlaps the next tick, split the work instead of waiting on or doubling it;
a user whose row another transaction holds is left for the next run), the other writes
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

# The next occurrence of the anchor day after :now, at the reset's time of day, in a month
# after the period's: in :now's month if that qualifies, else in the month after. A day
# past a month's end is its last day.
_NEXT_RESET = """
    (SELECT min(c) FROM (
        SELECT m + make_interval(days => least(d.day, extract(day FROM m + interval '1 month - 1 day')::int) - 1)
                 + (d.reset_local - date_trunc('day', d.reset_local)) AS c
        FROM (VALUES (date_trunc('month', n.now_local)),
                     (date_trunc('month', n.now_local) + interval '1 month')) AS months(m)
        WHERE m > date_trunc('month', d.reset_local)
    ) AS candidates WHERE c > n.now_local) AT TIME ZONE 'UTC'
"""

# 1. Lock a batch of due users, skipping rows another transaction holds. In READ COMMITTED,
#    a row committed by someone else after this statement began is locked in its newest
#    version and re-checked, so what is locked is due now.
_LOCK_DUE = """
SELECT id FROM users
WHERE credit_reset_at <= :now AND stripe_subscription_id IS NULL {only}
ORDER BY credit_reset_at
LIMIT :limit
FOR UPDATE SKIP LOCKED
"""

# 2. Reset them, in a statement of its own: its snapshot is taken after the locks, so it
#    reads every locked row as it now is, and nothing can change them until commit. (In one
#    statement, a row locked in a version newer than the statement's snapshot would be
#    read in its newest version by the lock but not found by the UPDATE.)
_RESET_LOCKED = f"""
WITH n AS (SELECT CAST(:now AS timestamptz) AS now, CAST(:now AS timestamptz) AT TIME ZONE 'UTC' AS now_local),
due AS (
    SELECT u.id, u.ctid AS row_ctid, u.plan_credits, u.purchased_credits, p.monthly_credits, p.name AS plan_name,
           (u.credit_reset_at AT TIME ZONE 'UTC')::date AS period,
           u.credit_reset_at AT TIME ZONE 'UTC' AS reset_local,
           coalesce(u.credit_reset_day, extract(day FROM u.credit_reset_at AT TIME ZONE 'UTC')::int) AS day
    FROM users u JOIN plans p ON p.id = u.plan_id, n
    WHERE u.id = ANY(:ids) AND u.credit_reset_at <= n.now AND u.stripe_subscription_id IS NULL
),
d AS (  -- a lookup by the (user, type, period) key per user, never a scan of the ledger
    SELECT due.*, already.id IS NULL AS fresh
    FROM due LEFT JOIN LATERAL (
        SELECT t.id FROM transactions t
        WHERE t.user_id = due.id AND t.type = 'monthly_reset' AND t.period = due.period
          AND t.stripe_object_id IS NULL
        LIMIT 1) AS already ON true
),
moved AS (
    UPDATE users u
    SET plan_credits = CASE WHEN d.fresh THEN d.monthly_credits ELSE u.plan_credits END,
        credit_reset_day = d.day,
        credit_reset_at = {_NEXT_RESET}
    FROM d, n
    WHERE u.ctid = d.row_ctid  -- the row read above, by its address (locked: it cannot have moved)
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
_LOCK_ANY = text(_LOCK_DUE.format(only=""))
_LOCK_ONE = text(_LOCK_DUE.format(only="AND id = :user_id"))
_RESET = text(_RESET_LOCKED)


def _reset(session: Session, lock, params: dict) -> int:
    ids = list(session.scalars(lock, params))
    if not ids:
        return 0
    return session.execute(_RESET, {"now": params["now"], "ids": ids}).scalar_one()


def reset_due_users(session: Session, *, limit: int, now: datetime | None = None) -> int:
    """Reset up to `limit` due users whose rows no other transaction holds; return how many.
    The caller commits (one batch, one transaction)."""
    return _reset(session, _LOCK_ANY, {"now": now or utcnow(), "limit": limit})


def reset_plan_credits(session: Session, user_id: uuid.UUID, now: datetime | None = None) -> bool:
    """Reset one user if due, by the same statements. False when not due, when a Stripe
    subscription serves them, or when another transaction is resetting them right now."""
    session.flush()
    reset = _reset(session, _LOCK_ONE, {"now": now or utcnow(), "limit": 1, "user_id": user_id})
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
