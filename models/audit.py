"""The audit: every invariant of the design, checked over all the data.

Each check is one query that returns only the rows that break it, read from a server-side
cursor in batches, so memory stays flat however many users, tasks, ledger rows, purchases
and events there are. The schema's constraints already make most of these impossible;
the audit is what proves it on the data itself (after a restore, a manual fix, a bug).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.orm import Session


@dataclass(frozen=True)
class Violation:
    check: str
    message: str


@dataclass(frozen=True)
class Check:
    name: str
    invariant: str  # which of the design's invariants it checks
    sql: str
    message: str  # formatted with the row's columns


CHECKS: tuple[Check, ...] = (
    Check("balance_is_buckets", "1", """
        SELECT id, credits, plan_credits, purchased_credits FROM users
        WHERE credits <> plan_credits + purchased_credits""",
          "user {id}: credits {credits} != plan {plan_credits} + purchased {purchased_credits}"),
    Check("balance_is_ledger", "1", """
        SELECT u.id, u.credits, u.plan_credits, u.purchased_credits,
               COALESCE(l.total, 0) AS total, COALESCE(l.plan, 0) AS plan, COALESCE(l.purchased, 0) AS purchased
        FROM users u LEFT JOIN (
            SELECT user_id, sum(amount) AS total, sum(plan_delta) AS plan, sum(purchased_delta) AS purchased
            FROM transactions GROUP BY user_id) l ON l.user_id = u.id
        WHERE u.credits <> COALESCE(l.total, 0) OR u.plan_credits <> COALESCE(l.plan, 0)
           OR u.purchased_credits <> COALESCE(l.purchased, 0)""",
          "user {id}: balance {credits} (plan {plan_credits}, purchased {purchased_credits}) but the ledger sums to "
          "{total} (plan {plan}, purchased {purchased})"),
    Check("no_negative_bucket", "2", """
        SELECT id, plan_credits, purchased_credits FROM users WHERE plan_credits < 0 OR purchased_credits < 0""",
          "user {id}: a negative bucket (plan {plan_credits}, purchased {purchased_credits})"),
    Check("charge_names_its_task", "3", """
        SELECT t.id, t.user_id, t.task_id, t.amount FROM transactions t
        LEFT JOIN ai_tasks a ON a.id = t.task_id
        WHERE t.type = 'credit_deduction'
          AND (a.id IS NULL OR a.user_id <> t.user_id OR t.amount <> -a.credits_used)""",
          "ledger row {id}: a charge of {amount} for task {task_id}, which is not that user's task at that price"),
    Check("charged_at_most_once", "3", """
        SELECT task_id, count(*) AS n FROM transactions WHERE type = 'credit_deduction'
        GROUP BY task_id HAVING count(*) > 1""",
          "task {task_id}: charged {n} times"),
    Check("refund_mirrors_its_charge", "3", """
        SELECT r.id, r.task_id, r.refund_of_id, r.amount FROM transactions r
        LEFT JOIN transactions c ON c.id = r.refund_of_id
        WHERE r.type = 'credit_refund'
          AND (c.id IS NULL OR c.type <> 'credit_deduction' OR c.task_id IS DISTINCT FROM r.task_id
               OR r.amount <> -c.amount OR r.plan_delta <> -c.plan_delta)""",
          "ledger row {id}: a refund of {amount} for task {task_id} without the charge it names ({refund_of_id})"),
    Check("refunded_at_most_once", "3", """
        SELECT refund_of_id, count(*) AS n FROM transactions WHERE type = 'credit_refund'
        GROUP BY refund_of_id HAVING count(*) > 1""",
          "charge {refund_of_id}: refunded {n} times"),
    Check("final_task_money", "3", """
        SELECT a.id, a.status, (c.id IS NOT NULL) AS charged, (r.id IS NOT NULL) AS refunded FROM ai_tasks a
        LEFT JOIN transactions c ON c.task_id = a.id AND c.type = 'credit_deduction'
        LEFT JOIN transactions r ON r.refund_of_id = c.id
        WHERE (a.status IN ('completed', 'processing') AND c.id IS NULL)
           OR (a.status = 'completed' AND r.id IS NOT NULL)
           OR (a.status = 'pending' AND c.id IS NOT NULL AND r.id IS NULL)
           OR (a.status IN ('failed', 'cancelled') AND c.id IS NOT NULL AND r.id IS NULL)
           OR (a.status = 'expired' AND c.id IS NOT NULL)""",
          "task {id}: {status}, charged={charged}, refunded={refunded}"),
    Check("stripe_event_moves_money_once", "4", """
        SELECT stripe_event_id, type, count(*) AS n FROM transactions WHERE stripe_event_id IS NOT NULL
        GROUP BY stripe_event_id, type HAVING count(*) > 1""",
          "Stripe event {stripe_event_id}: {n} ledger rows of type {type}"),
    Check("stripe_object_moves_money_once", "4", """
        SELECT stripe_object_id, type, count(*) AS n FROM transactions WHERE stripe_object_id IS NOT NULL
        GROUP BY stripe_object_id, type HAVING count(*) > 1""",
          "Stripe object {stripe_object_id}: {n} ledger rows of type {type}"),
    Check("one_reset_per_period", "5", """
        SELECT user_id, type, period, count(*) AS n FROM transactions
        WHERE period IS NOT NULL AND stripe_object_id IS NULL
        GROUP BY user_id, type, period HAVING count(*) > 1""",
          "user {user_id}: {n} {type} rows for the period {period}"),
    Check("ledger_event_is_stored", "4", """
        SELECT t.id, t.stripe_event_id FROM transactions t
        LEFT JOIN stripe_events e ON e.id = t.stripe_event_id
        WHERE t.stripe_event_id IS NOT NULL AND e.id IS NULL""",
          "ledger row {id}: names the Stripe event {stripe_event_id}, which was never stored"),
    Check("event_applied_before_its_entries", "4", """
        SELECT e.id, e.type FROM stripe_events e
        JOIN transactions t ON t.stripe_event_id = e.id
        WHERE e.handled_at IS NULL
        GROUP BY e.id, e.type""",
          "Stripe event {id} ({type}): moved money but is not marked handled"),
    Check("no_beat_reset_in_a_paid_period", "5", """
        SELECT b.user_id, b.period, p.stripe_object_id AS invoice FROM transactions b
        JOIN transactions p ON p.user_id = b.user_id AND p.type = 'monthly_reset' AND p.stripe_object_id IS NOT NULL
        WHERE b.type = 'monthly_reset' AND b.stripe_object_id IS NULL
          AND b.created_at > p.created_at AND b.period < (p.period + interval '1 month')::date
          AND b.period >= p.period
          AND NOT EXISTS (  -- the subscription ended first: beat serves the user again from then
              SELECT 1 FROM plan_changes c WHERE c.user_id = b.user_id AND c.reason = 'subscription_ended'
                AND c.created_at BETWEEN p.created_at AND b.created_at)""",
          "user {user_id}: a beat reset for {period} inside the period paid by invoice {invoice}"),
    Check("purchase_granted_once_when_paid", "4", """
        SELECT p.id, p.status, count(t.id) AS n FROM purchases p
        LEFT JOIN transactions t ON t.purchase_id = p.id AND t.type = 'credit_purchase'
        GROUP BY p.id, p.status
        HAVING count(t.id) <> CASE WHEN p.status = 'paid' THEN 1 ELSE 0 END""",
          "purchase {id}: {status} with {n} credit_purchase rows"),
    Check("takes_within_grant", "7", """
        SELECT id, credits, credits_taken_back, shortfall, dispute_taken, dispute_reinstated FROM purchases
        WHERE credits_taken_back + shortfall > credits OR dispute_reinstated > dispute_taken
           OR credits_taken_back < 0 OR shortfall < 0""",
          "purchase {id}: granted {credits}, taken back {credits_taken_back} + shortfall {shortfall}; "
          "the dispute took {dispute_taken} and gave back {dispute_reinstated}"),
    Check("reinstated_within_what_the_dispute_took", "7", """
        SELECT r.stripe_object_id AS dispute, r.amount AS reinstated,
               COALESCE(-sum(c.amount), 0) AS taken FROM transactions r
        LEFT JOIN transactions c ON c.stripe_object_id = r.stripe_object_id AND c.type = 'credit_clawback'
        WHERE r.type = 'credit_reinstated'
        GROUP BY r.id, r.stripe_object_id, r.amount
        HAVING r.amount > COALESCE(-sum(c.amount), 0)""",
          "dispute {dispute}: {reinstated} reinstated, but it took {taken}"),
    Check("takes_match_the_ledger", "7", """
        SELECT p.id, p.credits_taken_back, COALESCE(-sum(t.amount), 0) AS ledger FROM purchases p
        LEFT JOIN transactions t ON t.purchase_id = p.id AND t.type IN ('credit_clawback', 'credit_reinstated')
        GROUP BY p.id, p.credits_taken_back
        HAVING p.credits_taken_back <> COALESCE(-sum(t.amount), 0)""",
          "purchase {id}: {credits_taken_back} taken back, but its ledger rows take {ledger}"),
)


def run_checks(session: Session, *, batch: int = 1000) -> Iterator[Violation]:
    """Every violation of every check, streamed."""
    for check in CHECKS:
        result = session.execute(text(check.sql).execution_options(yield_per=batch))
        for row in result.mappings():
            yield Violation(check.name, check.message.format(**row))
