"""Monthly resets at scale: a million due users reset by `studiox credits reset-due`, against
the per-user loop the reset used before it was set-based, measured in the same run.

data:     N users (default 1,000,000; --quick 100,000) due for a reset, generated in bulk by
          SQL with their ledger rows (a signup grant each, a purchase for one in ten, so the
          balance equals the ledger), on the free, pro and enterprise plans, their periods
          having ended over the last 25 days; then VACUUM ANALYZE.
baseline: the per-user loop of before (one transaction per user: lock the row, read the
          plan, post the expiry and the grant, move the date in Python), on the S users
          due first (default 5,000), in this process.
ours:     `studiox credits reset-due` as an operator runs it, in its own process: first with
          `--limit 10000`, then the rest; users per second from the whole run. Its peak
          RSS in both runs shows memory flat in the number of users.
checks:   every user reset exactly once, balances equal to the ledger, and `studiox audit`
          over the whole database (time and peak RSS printed).

Targets (issue 13): the million within 30 s (>= 33,333 users/s) and >= 50x the per-user loop.

    python -m bench.reset [--quick] [-n N] [--sample S] [--no-audit]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from .common import ROOT, Env, Row, bench_env, print_table, sigterm_as_exit, write_results

ONE_MILLION_IN_S = 30.0
SPEEDUP_TARGET = 50.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.reset", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="N=100,000 and S=2,000 unless given")
    p.add_argument("-n", "--users", type=int, help="due users (default 1,000,000)")
    p.add_argument("--sample", type=int, help="users reset by the per-user loop (default 5,000)")
    p.add_argument("--no-audit", action="store_true", help="skip `studiox audit` at the end")
    args = p.parse_args(argv)
    args.users = args.users or (100_000 if args.quick else 1_000_000)
    args.sample = args.sample or (2_000 if args.quick else 5_000)
    return args


def generate(env: Env, n: int) -> float:
    """N due users with their ledger rows, in bulk; returns the seconds it took."""
    began = time.monotonic()
    with env.engine.begin() as conn:
        conn.execute(text("""
            INSERT INTO users (id, clerk_id, plan_id, plan_credits, purchased_credits, credit_reset_at,
                               credit_reset_day, created_at)
            SELECT gen_random_uuid(), 'bench_' || i,
                   CASE WHEN i % 10 = 0 THEN 'pro' WHEN i % 50 = 1 THEN 'enterprise' ELSE 'free' END,
                   i % 21, CASE WHEN i % 10 = 3 THEN 100 ELSE 0 END,
                   t, extract(day FROM t AT TIME ZONE 'UTC'), now() - interval '40 days'
            FROM generate_series(1, :n) AS i,
                 -- due from 1 minute to 25 days ago: a month on from each is days ahead, so no
                 -- user's next period can start while the benchmark runs
                 LATERAL (SELECT now() - make_interval(mins => 1 + i % 36000)) AS due(t)
        """), {"n": n})
        conn.execute(text("""
            INSERT INTO transactions (user_id, amount, plan_delta, purchased_delta, bucket, balance_after, type,
                                      description, created_at)
            SELECT id, e.amount, e.plan_delta, e.purchased_delta, e.bucket, e.balance_after, e.type, 'bench', created_at
            FROM users CROSS JOIN LATERAL (VALUES
                (1, 'signup_grant', plan_credits, plan_credits, 0, 'plan', plan_credits),
                (2, 'credit_purchase', purchased_credits, 0, purchased_credits, 'purchased', credits)
            ) AS e(seq, type, amount, plan_delta, purchased_delta, bucket, balance_after)
            WHERE e.amount <> 0
            ORDER BY id, e.seq
        """))
    with env.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE users"))
        conn.execute(text("VACUUM ANALYZE transactions"))
    return time.monotonic() - began


# --- the baseline: the per-user reset of before (models/credits.py until issue 13) ------------

def per_user_loop(sessions: sessionmaker[Session], count: int) -> tuple[int, float]:
    from models.base import utcnow
    from models.credits import post_entry
    from models.plans import get_plan
    from models.resets import add_months
    from models.users import User, lock_user

    def reset_one(session: Session, user_id: uuid.UUID, now) -> bool:
        user = lock_user(session, user_id)
        if user.credit_reset_at is None or user.credit_reset_at > now or user.stripe_subscription_id is not None:
            return False
        period = user.credit_reset_at.date()
        plan = get_plan(session, user.plan_id)
        if user.plan_credits:
            post_entry(session, user.id, type="credit_expiry", plan_delta=-user.plan_credits, period=period,
                       description="Unused plan credits expired")
        if plan.monthly_credits:
            post_entry(session, user.id, type="monthly_reset", plan_delta=plan.monthly_credits, period=period,
                       description=f"Monthly credits for the {plan.name} plan")
        next_reset = user.credit_reset_at
        while next_reset <= now:
            next_reset = add_months(next_reset, 1)
        user.credit_reset_at = next_reset
        session.flush()
        return True

    began = time.monotonic()
    done = 0
    while done < count:
        now = utcnow()
        with sessions() as session:  # the old job: read a batch of due ids, then a transaction each
            due = list(session.scalars(
                select(User.id).where(User.credit_reset_at <= now, User.stripe_subscription_id.is_(None))
                .order_by(User.credit_reset_at).limit(min(500, count - done))))
        if not due:
            break
        for user_id in due:
            with sessions() as session, session.begin():
                done += reset_one(session, user_id, now)
    return done, time.monotonic() - began


# --- ours: the operator's command, in its own process ----------------------------------------

def run_cli(env: Env, *args: str) -> tuple[str, float, int]:
    """Run `studiox ARGS`; return its output, wall seconds and peak RSS in KiB."""
    cli = Path(sys.executable).with_name("studiox")
    command = [str(cli)] if cli.exists() else [sys.executable, "-m", "cli.main"]
    began = time.monotonic()
    process = subprocess.Popen([*command, *args], cwd=ROOT, env=env.process_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.monotonic() - began
    if process.returncode not in (0, 1) or (process.returncode == 1 and args[0] != "audit"):
        raise RuntimeError(f"studiox {' '.join(args)} exited {process.returncode}: {output}")
    return output.strip(), elapsed, usage.ru_maxrss


def reported(output: str) -> tuple[int, float]:
    match = re.search(r"reset (\d+) user\(s\) in ([\d.]+) s", output)
    if not match:
        raise RuntimeError(f"unexpected output: {output}")
    return int(match.group(1)), float(match.group(2))


def write_floor(env: Env) -> float:
    """Seconds for the reset's bare writes over every user, with no locking, batching or
    logic: one UPDATE of every user's bucket and date, one INSERT of two ledger rows each
    (the same indexes and foreign keys), rolled back. What no reset of these rows can beat
    on this server."""
    with env.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE users"))
        conn.execute(text("VACUUM ANALYZE transactions"))
    with env.engine.connect() as conn:
        began = time.monotonic()
        with conn.begin() as transaction:
            conn.execute(text("UPDATE users SET credit_reset_at = credit_reset_at + interval '1 month', "
                              "plan_credits = 20"))
            conn.execute(text("""
                INSERT INTO transactions (user_id, amount, plan_delta, purchased_delta, bucket, balance_after, type,
                                          period, description, created_at)
                SELECT id, e.amount, e.amount, 0, 'plan', 20, e.type, (credit_reset_at + interval '3 months')::date,
                       'floor', now()
                FROM users CROSS JOIN LATERAL (VALUES ('credit_expiry', -1), ('monthly_reset', 21)) AS e(type, amount)
            """))
            seconds = time.monotonic() - began
            transaction.rollback()
    return seconds


def check_once(env: Env, n: int) -> None:
    with env.engine.connect() as conn:
        resets, users, due, mismatched = conn.execute(text("""
            SELECT (SELECT count(*) FROM transactions WHERE type = 'monthly_reset'),
                   (SELECT count(DISTINCT user_id) FROM transactions WHERE type = 'monthly_reset'),
                   (SELECT count(*) FROM users WHERE credit_reset_at <= now()),
                   (SELECT count(*) FROM users u JOIN (SELECT user_id, sum(amount) AS total FROM transactions
                                                       GROUP BY user_id) l ON l.user_id = u.id
                    WHERE l.total <> u.credits)
        """)).one()
    if (resets, users, due, mismatched) != (n, n, 0, 0):
        raise RuntimeError(f"resets={resets} users={users} still due={due} ledger mismatches={mismatched}, "
                           f"expected {n} reset once each")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sigterm_as_exit()
    from models.db import make_session_factory

    with bench_env("reset") as env:
        made = generate(env, args.users)
        print(f"generated {args.users:,} due users and their ledger rows in {made:.1f} s", flush=True)
        sessions = make_session_factory(env.engine)
        sample_done, sample_s = per_user_loop(sessions, args.sample)
        baseline_rate = sample_done / sample_s

        first_out, first_s, first_rss = run_cli(env, "credits", "reset-due", "--limit", "10000")
        rest_out, rest_s, rest_rss = run_cli(env, "credits", "reset-due")
        first_done, first_in = reported(first_out)
        rest_done, rest_in = reported(rest_out)
        done, seconds = first_done + rest_done, first_in + rest_in
        rate = done / seconds
        check_once(env, args.users)
        floor_s = write_floor(env)
        floor_rate = args.users / floor_s
        audit = None
        if not args.no_audit:
            audit_out, audit_s, audit_rss = run_cli(env, "audit")
            audit = {"seconds": round(audit_s, 1), "peak_rss_mib": round(audit_rss / 1024, 1),
                     "summary": audit_out.splitlines()[-1] if audit_out else ""}

        rows = [
            Row("reset-due vs the per-user loop", rate, baseline_rate, "users/s", SPEEDUP_TARGET),
            Row(f"reset-due vs 1M in {ONE_MILLION_IN_S:g} s", rate, 1_000_000 / ONE_MILLION_IN_S, "users/s", 1.0),
            Row("floor: the bare writes, one statement each (info)", floor_rate, 1_000_000 / ONE_MILLION_IN_S,
                "users/s"),
            Row("reset-due vs that floor (info)", rate, floor_rate, "users/s"),
        ]
        notes = [
            f"studiox credits reset-due: {done:,} users in {seconds:.1f} s (its own clock; the process "
            f"{first_s + rest_s:.1f} s with start-up), {1_000_000 / rate:.1f} s per million at this rate",
            f"per-user loop: {sample_done:,} users in {sample_s:.1f} s",
            f"floor: {args.users:,} users' update and 2 ledger rows each in {floor_s:.1f} s in one backend "
            f"(rolled back); reset-due runs 2 batches at once",
            f"peak RSS of the CLI: {first_rss / 1024:.0f} MiB for {first_done:,} users, "
            f"{rest_rss / 1024:.0f} MiB for {rest_done:,} users",
            "every user reset exactly once; every balance equals its ledger",
        ]
        if audit:
            notes.append(f"studiox audit over {args.users:,} users: {audit['seconds']} s, peak RSS "
                         f"{audit['peak_rss_mib']} MiB: {audit['summary']}")
        params = {"users": args.users, "sample": args.sample, "batch": _batch()}
        print_table("monthly resets", rows, params, notes)
        write_results("reset", {"parameters": params, "rows": [r.as_dict() for r in rows], "notes": notes,
                                "audit": audit})


def _batch() -> int:
    from worker.jobs import RESET_BATCH

    return RESET_BATCH


if __name__ == "__main__":
    main()
