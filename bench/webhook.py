"""Stripe webhook deliveries stored per second, against GET /health under the same gunicorn;
and how long after the last delivery every event is applied.

ours:     N signed deliveries (default 2,000; a quarter of them re-deliveries of event ids
          already sent, so 0.75 N distinct events) POSTed to /api/billing/webhook by C
          client threads (default 8), each on its own kept-alive http.client connection,
          bodies and signatures made before the clock. Each answer is the event row stored
          (one autocommitted INSERT); the API queues a coalesced `apply_stripe_events` job at
          most every half second per process. A Celery worker on the `maintenance` queue (as
          the Procfile's worker_ops, -c 2) applies the events meanwhile, a batch per
          transaction, as it would in production.
baseline: N GET /health by the same client with the same threads and connections, before
          and after the deliveries (the median of the rounds).
applied:  from the last delivery's answer until `stripe_events` holds every distinct event
          and none is unhandled (the database polled every 20 ms). Limit: 30 s.

The events need neither Stripe nor a user: `checkout.session.completed` for Checkout
Sessions we never created (outcome `unknown_session`: nothing granted) and types we do not
handle (`payout.paid`, `customer.created`, ...: `ignored`), bodies of 1-2 KB as Stripe's are.
At the end every distinct event must be stored once and applied exactly once (attempts = 1).

    python -m bench.webhook [--quick] [-n N] [--clients C] [--concurrency W]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import random
import statistics
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from http.client import HTTPConnection, HTTPException
from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from sqlalchemy import text

from .common import (
    RESULTS_DIR,
    CpuMeter,
    Env,
    Row,
    bench_env,
    percentiles,
    print_table,
    sigterm_as_exit,
    start_celery_worker,
    start_gunicorn,
    write_results,
)

STORE_TARGET = 0.5  # webhook deliveries/s over GET /health requests/s
APPLY_LIMIT_S = 30.0  # every event applied within this many seconds of the last delivery
DUPLICATE_SHARE = 0.25
WEBHOOK_PATH = "/api/billing/webhook"
SECRET = "whsec_bench_" + "k" * 24
API_VERSION = "2026-10-28.endive"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.webhook", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="N=400 unless -n is given")
    p.add_argument("-n", "--events", type=int,
                   help="deliveries, a quarter of them re-deliveries (default 2000, 400 with --quick)")
    p.add_argument("--clients", type=int, default=8, help="client threads, one keep-alive connection each (default 8)")
    p.add_argument("--concurrency", "-c", type=int, default=2, help="Celery worker -c on `maintenance` (default 2)")
    p.add_argument("--http-workers", type=int, default=2, help="gunicorn -w (default 2)")
    p.add_argument("--http-threads", type=int, default=4, help="gunicorn --threads with gthread (default 4)")
    p.add_argument("--http-worker-class", default="gevent", help="gunicorn -k (default gevent, as gunicorn.conf.py)")
    p.add_argument("--rounds", type=int, default=3,
                   help="GET /health measurements (before and after the deliveries), median reported (default 3)")
    p.add_argument("--loglevel", default="info", help="the worker's -l (default info, as in the Procfile)")
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait for every event to be applied")
    p.add_argument("--seed", type=int, default=1, help="the order of events and re-deliveries (default 1)")
    # `python -m bench` passes its extra options to every benchmark; each takes its own.
    args, ignored = p.parse_known_args(argv)
    if ignored:
        print(f"{p.prog}: ignoring options it does not take: {' '.join(ignored)}", flush=True)
    args.events = args.events or (400 if args.quick else 2000)
    if args.events < 4 * args.clients:
        p.error(f"-n must be at least {4 * args.clients}")
    return args


# --- events --------------------------------------------------------------------------------


def sign(payload: bytes, secret: str, timestamp: int) -> str:
    """The Stripe-Signature header Stripe sends with `payload`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def _rid(rng: random.Random, prefix: str, length: int = 24) -> str:
    return prefix + "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
                            for _ in range(length))


def _checkout_session(rng: random.Random, created: int) -> dict[str, Any]:
    """A paid one-time Checkout Session as Stripe sends it, for a session we never created."""
    amount = rng.choice((500, 1000, 2500, 5000))
    customer = _rid(rng, "cus_", 14)
    return {
        "id": _rid(rng, "cs_test_", 58), "object": "checkout.session", "amount_subtotal": amount,
        "amount_total": amount, "cancel_url": "https://studiox.example/billing/cancel",
        "client_reference_id": None, "created": created - 40, "currency": "usd", "customer": customer,
        "customer_details": {"address": {"country": "US", "postal_code": "94103"},
                             "email": f"buyer{rng.randrange(10**6)}@example.com", "name": "Bench Buyer",
                             "tax_exempt": "none"},
        "expires_at": created + 86_360, "invoice": None, "livemode": False, "locale": None,
        "metadata": {"pack": rng.choice(("small", "medium", "large")), "user_id": _rid(rng, "", 32)},
        "mode": "payment", "payment_intent": _rid(rng, "pi_"), "payment_link": None,
        "payment_method_types": ["card", "link"], "payment_status": "paid", "setup_intent": None,
        "status": "complete", "subscription": None,
        "success_url": "https://studiox.example/billing/success?session_id={CHECKOUT_SESSION_ID}",
        "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0}, "ui_mode": "hosted",
        "url": None,
    }


def _payout(rng: random.Random, created: int) -> dict[str, Any]:
    amount = rng.randrange(10_000, 900_000)
    return {
        "id": _rid(rng, "po_"), "object": "payout", "amount": amount, "application_fee": None,
        "application_fee_amount": None, "arrival_date": created + 86_400, "automatic": True,
        "balance_transaction": _rid(rng, "txn_"), "created": created - 3600, "currency": "usd",
        "description": "STRIPE PAYOUT", "destination": _rid(rng, "ba_"), "failure_balance_transaction": None,
        "failure_code": None, "failure_message": None, "livemode": False, "metadata": {}, "method": "standard",
        "original_payout": None, "reconciliation_status": "completed", "reversed_by": None, "source_type": "card",
        "statement_descriptor": None, "status": "paid", "trace_id": {"status": "supported", "value": None},
        "type": "bank_account",
    }


def _customer(rng: random.Random, created: int) -> dict[str, Any]:
    return {
        "id": _rid(rng, "cus_", 14), "object": "customer", "address": None, "balance": 0, "created": created,
        "currency": None, "default_source": None, "delinquent": False, "description": None, "discount": None,
        "email": f"someone{rng.randrange(10**6)}@example.com", "invoice_prefix": _rid(rng, "", 8).upper(),
        "invoice_settings": {"custom_fields": None, "default_payment_method": None, "footer": None,
                             "rendering_options": None},
        "livemode": False, "metadata": {"user_id": _rid(rng, "", 32)}, "name": "Bench Customer", "phone": None,
        "preferred_locales": ["en-US"], "shipping": None, "tax_exempt": "none", "test_clock": None,
    }


# (type, weight, object maker): most deliveries are the Checkout completions we handle.
EVENT_KINDS = (
    ("checkout.session.completed", 6, _checkout_session),
    ("payout.paid", 2, _payout),
    ("customer.created", 1, _customer),
    ("customer.updated", 1, _customer),
)


def make_event(rng: random.Random, created: int) -> bytes:
    kind, _, maker = rng.choices(EVENT_KINDS, weights=[k[1] for k in EVENT_KINDS])[0]
    event = {
        "id": _rid(rng, "evt_"), "object": "event", "api_version": API_VERSION, "created": created,
        "data": {"object": maker(rng, created)}, "livemode": False, "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None}, "type": kind,
    }
    return json.dumps(event, indent=2).encode()  # Stripe sends its events indented


@dataclass
class Deliveries:
    bodies: list[bytes]  # in the order they are sent
    headers: list[dict[str, str]]
    event_ids: list[str]  # the distinct ones
    redeliveries: int


def make_deliveries(n: int, clients: int, seed: int, id_prefix: str = "") -> Deliveries:
    """N deliveries, N/4 of them re-deliveries of an event sent at least 8 x `clients` places
    earlier (fewer for a small N; so, with every client at about the same pace, after its first delivery was
    answered); a re-delivery is the same body signed with a later timestamp, as Stripe's."""
    rng = random.Random(seed)
    dup_count = round(n * DUPLICATE_SHARE)
    gap = max(1, min(8 * clients, n // 8))
    now = int(time.time())
    positions = set(rng.sample(range(2 * gap, n), dup_count)) if dup_count else set()
    bodies: list[bytes] = []
    headers: list[dict[str, str]] = []
    ids: list[str] = []
    sent_at: list[int] = []  # position of each distinct event's first delivery
    not_yet_repeated: list[int] = []
    for pos in range(n):
        if pos in positions:
            eligible = [k for k in not_yet_repeated if sent_at[k] <= pos - gap] or \
                       [k for k in range(len(ids)) if sent_at[k] <= pos - gap]
            k = rng.choice(eligible)
            if k in not_yet_repeated:
                not_yet_repeated.remove(k)
            body = bodies[sent_at[k]]
            stamp = now + 1 + rng.randrange(5)
        else:
            body = make_event(rng, now - rng.randrange(1, 30))
            if id_prefix:
                event = json.loads(body)
                event["id"] = id_prefix + event["id"]
                body = json.dumps(event, indent=2).encode()
            ids.append(json.loads(body)["id"])
            sent_at.append(pos)
            not_yet_repeated.append(len(ids) - 1)
            stamp = now
        bodies.append(body)
        headers.append({"Content-Type": "application/json; charset=utf-8",
                        "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
                        "Stripe-Signature": sign(body, SECRET, stamp)})
    return Deliveries(bodies, headers, ids, dup_count)


# --- load ----------------------------------------------------------------------------------


@dataclass
class Run:
    requests: int
    seconds: float
    ended_at: float  # perf_counter of the last answer
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    errors: list[str] = field(default_factory=list)
    duplicates: int = 0  # answers {"duplicate": true}

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        out = {"requests": self.requests, "ok": self.ok, "errors": len(self.errors), "seconds": round(self.seconds, 3),
               "rate": round(self.rate, 1)}
        if self.latencies_ms:
            out.update(percentiles(self.latencies_ms), p99_ms=p99(self.latencies_ms))
        if self.errors:
            out["error_samples"] = self.errors[:3]
        return out


def p99(values_ms: list[float]) -> float:
    values = sorted(values_ms)
    return round(values[min(len(values) - 1, int(0.99 * len(values)))], 2)


def send_all(base_url: str, method: str, path: str, bodies: list[bytes | None], headers: list[dict[str, str]],
             clients: int, *, expect_ack: bool = False) -> Run:
    """Request i (body i, headers i) is sent by client thread i % clients, in order, each thread
    on its own kept-alive http.client connection opened before the clock. The time runs from
    the threads' common start to the last answer. The same function measures both sides."""
    n = len(bodies)
    url = urlsplit(base_url)
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)
    run = Run(n, 0.0, 0.0)
    ends: list[float] = []

    def work(t: int) -> None:
        lat: list[float] = []
        errors: list[str] = []
        dups = 0
        http = HTTPConnection(url.hostname, url.port, timeout=30)
        try:
            http.request("GET", "/health")
            http.getresponse().read()
        finally:
            barrier.wait()
        try:
            for i in range(t, n, clients):
                began = time.perf_counter()
                try:
                    http.request(method, path, body=bodies[i], headers=headers[i])
                    r = http.getresponse()
                    data = r.read()
                except (OSError, HTTPException) as exc:
                    errors.append(repr(exc))
                    http.close()  # reconnects on the next request
                    continue
                if r.status == 200:
                    lat.append((time.perf_counter() - began) * 1000)
                    if expect_ack and b'"duplicate":true' in data.replace(b" ", b""):
                        dups += 1
                else:
                    errors.append(f"{r.status} {data[:200]!r}")
        finally:
            end = time.perf_counter()
            http.close()
            with lock:
                run.latencies_ms.extend(lat)
                run.errors.extend(errors)
                run.duplicates += dups
                ends.append(end)

    threads = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(clients)]
    for th in threads:
        th.start()
    barrier.wait()
    began = time.perf_counter()
    for th in threads:
        th.join()
    run.ended_at = max(ends)
    run.seconds = run.ended_at - began
    return run


def health(base_url: str, n: int, clients: int) -> Run:
    return send_all(base_url, "GET", "/health", [None] * n, [{}] * n, clients)


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all processes, all CPUs)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class Metered:
    """CpuMeter over our process trees, plus the CPU the rest of the machine (other people's
    processes) used meanwhile, as a share of the machine's capacity."""

    def __init__(self, roots: dict[str, int]):
        self.cpu = CpuMeter(roots)
        self.others_share = 0.0

    def __enter__(self) -> Metered:
        self.busy, self.began = machine_busy_seconds(), time.perf_counter()
        self.cpu.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.cpu.__exit__(*exc)
        elapsed = time.perf_counter() - self.began
        others = machine_busy_seconds() - self.busy - sum(self.cpu.used.values())
        self.others_share = max(0.0, others / (elapsed * (os.cpu_count() or 1))) if elapsed > 0 else 0.0

    def per_item_ms(self, items: int) -> dict[str, float]:
        return self.cpu.per_item_ms(items)


# --- the database --------------------------------------------------------------------------

_PROGRESS = text("SELECT count(*), count(*) FILTER (WHERE handled_at IS NULL) FROM stripe_events")


def wait_applied(env: Env, distinct: int, timeout: float) -> tuple[float, int, int]:
    """Poll until `distinct` events are stored and none is unhandled: (perf_counter then,
    stored, unhandled)."""
    deadline = time.perf_counter() + timeout
    with env.engine.connect() as conn:
        while True:
            stored, unhandled = conn.execute(_PROGRESS).one()
            conn.rollback()
            now = time.perf_counter()
            if stored >= distinct and unhandled == 0:
                return now, stored, unhandled
            if now > deadline:
                return now, stored, unhandled
            time.sleep(0.02)


def verify_rows(env: Env, ids: list[str]) -> dict[str, Any]:
    with env.engine.connect() as conn:
        row = conn.execute(text(
            "SELECT count(*), count(*) FILTER (WHERE id = ANY(:ids)), count(*) FILTER (WHERE handled_at IS NULL),"
            " count(*) FILTER (WHERE attempts <> 1), count(*) FILTER (WHERE last_error IS NOT NULL),"
            " extract(epoch FROM max(handled_at) - min(received_at)), extract(epoch FROM max(handled_at)),"
            " avg(octet_length(payload::text))"
            " FROM stripe_events"), {"ids": ids}).one()
        outcomes = dict(conn.execute(text(
            "SELECT coalesce(outcome, '(none)'), count(*) FROM stripe_events GROUP BY 1 ORDER BY 2 DESC")).all())
        delays = [float(x) * 1000 for (x,) in conn.execute(text(
            "SELECT extract(epoch FROM handled_at - received_at) FROM stripe_events WHERE handled_at IS NOT NULL"))]
    total, ours, unhandled, bad_attempts, with_error, span, last_handled, payload_bytes = row
    return {"rows": total, "rows_of_this_run": ours, "unhandled": unhandled, "attempts_not_1": bad_attempts,
            "with_last_error": with_error, "first_received_to_last_handled_s": round(float(span or 0), 3),
            "last_handled_epoch": float(last_handled or 0), "avg_payload_bytes": round(float(payload_bytes or 0)),
            "outcomes": outcomes, "received_to_handled": percentiles(delays) if delays else {}}


# --- reporting -----------------------------------------------------------------------------


@dataclass
class LimitRow(Row):
    """A lower-is-better measurement against an absolute limit (no in-run baseline)."""

    limit: float = 0.0

    @property
    def meets(self) -> bool:
        return self.ours <= self.limit

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "ours": round(self.ours, 3), "unit": self.unit,
                "limit": self.limit, "meets_target": self.meets}

    def cells(self) -> tuple[str, ...]:
        return (self.metric, f"{self.ours:,.2f} {self.unit}", "-", "-",
                f"<= {self.limit:g} {self.unit} {'ok' if self.meets else 'ABOVE'}")


# --- the run -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    sigterm_as_exit()
    n, clients = args.events, args.clients
    logs = RESULTS_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    deliveries = make_deliveries(n, clients, args.seed)
    distinct = len(deliveries.event_ids)
    sizes = [len(b) for b in deliveries.bodies]
    print(f"webhook: {n} deliveries ({distinct} events, {deliveries.redeliveries} re-deliveries) by {clients} clients,"
          f" worker -c {args.concurrency}; starting servers...", flush=True)
    stripe_env = {"STRIPE_SECRET_KEY": "sk_test_bench", "STRIPE_WEBHOOK_SECRET": SECRET,
                  # Nothing listens there: for these event types nothing calls Stripe.
                  "STRIPE_API_BASE": "http://127.0.0.1:9"}

    with bench_env("webhook") as env, ExitStack() as procs:
        client = Celery("bench_client", broker=env.redis_url, set_as_current=False)
        client.config_from_object("celeryconfig")
        procs.callback(client.close)
        gunicorn, base_url = start_gunicorn(env, workers=args.http_workers, threads=args.http_threads,
                                            worker_class=args.http_worker_class, extra_env=stripe_env,
                                            log_path=logs / "webhook-gunicorn.log")
        procs.callback(gunicorn.stop)
        # The Procfile's worker_ops: the maintenance queue.
        worker = start_celery_worker("worker.app", queues="maintenance", concurrency=args.concurrency,
                                     name="bench-ops", ping_app=client, loglevel=args.loglevel,
                                     env=env.process_env(**stripe_env), log_path=logs / "webhook-worker.log")
        procs.callback(worker.stop)
        roots = {"api": gunicorn.popen.pid, "worker": worker.popen.pid, **env.server_pids}

        # Warm-up, untimed: both gunicorn workers' connections, the worker's children; the
        # warm-up's events are then deleted so the table holds this run's events only.
        print("webhook: warming up...", flush=True)
        warm = make_deliveries(max(16 * clients, 160), clients, args.seed + 1000, id_prefix="warm_")
        warm_run = send_all(base_url, "POST", WEBHOOK_PATH, warm.bodies, warm.headers, clients, expect_ack=True)
        if warm_run.errors:
            raise RuntimeError(f"{len(warm_run.errors)} warm-up deliveries failed, e.g. {warm_run.errors[:3]}")
        _, stored, unhandled = wait_applied(env, len(warm.event_ids), args.timeout)
        if unhandled or stored < len(warm.event_ids):
            raise RuntimeError(f"warm-up: {unhandled} of {stored} events not applied in {args.timeout:.0f}s;"
                               f" worker log:\n{worker.log_tail()}")
        with env.engine.begin() as conn:
            conn.execute(text("DELETE FROM stripe_events"))
        health(base_url, 1000, clients)

        health_runs: list[dict[str, Any]] = []
        before = max(1, args.rounds - args.rounds // 2)
        for _ in range(before):
            with Metered(roots) as cpu:
                h = health(base_url, n, clients)
            health_runs.append({**h.summary(), "cpu_ms_per_request": cpu.per_item_ms(max(h.ok, 1)),
                                "others_cpu_share": round(cpu.others_share, 3)})
            print(f"webhook: GET /health {h.rate:,.0f} req/s", flush=True)
            time.sleep(0.3)

        with Metered(roots) as store_cpu:
            store = send_all(base_url, "POST", WEBHOOK_PATH, deliveries.bodies, deliveries.headers, clients,
                             expect_ack=True)
        last_answer_wall = time.time() - (time.perf_counter() - store.ended_at)
        with env.engine.connect() as conn:
            at_last = conn.execute(_PROGRESS).one()
        print(f"webhook: stored {store.rate:,.0f} deliveries/s ({len(store.errors)} errors);"
              f" {at_last[1]} of {at_last[0]} events unapplied at the last answer", flush=True)
        with CpuMeter(roots) as tail_cpu:
            done_at, stored, unhandled = wait_applied(env, distinct, args.timeout)
        applied_s = done_at - store.ended_at
        print(f"webhook: all applied {applied_s:.2f} s after the last delivery", flush=True)
        check = verify_rows(env, deliveries.event_ids)

        for _ in range(args.rounds - before):
            time.sleep(0.3)
            with Metered(roots) as cpu:
                h = health(base_url, n, clients)
            health_runs.append({**h.summary(), "cpu_ms_per_request": cpu.per_item_ms(max(h.ok, 1)),
                                "others_cpu_share": round(cpu.others_share, 3)})
            print(f"webhook: GET /health {h.rate:,.0f} req/s", flush=True)

    health_rate = statistics.median(r["rate"] for r in health_runs)
    complete = not unhandled and stored >= distinct
    rows: list[Row] = [
        Row("GET /health (baseline)", health_rate, health_rate, "req/s"),
        Row("webhook store vs GET /health", store.rate, health_rate, "req/s", STORE_TARGET),
        LimitRow("applied after last delivery", applied_s if complete else args.timeout, 0.0, "s",
                 limit=APPLY_LIMIT_S),
    ]
    params = {"deliveries": n, "events": distinct, "redeliveries": deliveries.redeliveries, "clients": clients,
              "client": "python http.client keep-alive, one thread each", "health_rounds": len(health_runs),
              "gunicorn": f"-w {args.http_workers} -k {args.http_worker_class}",
              "worker": f"-Q maintenance -c {args.concurrency} -P prefork -l {args.loglevel}",
              "body_bytes": f"{min(sizes)}-{max(sizes)} (mean {statistics.fmean(sizes):.0f})"}
    s, hl = store.summary(), health_runs[-1]
    notes = [
        f"webhook POST latency: p50 {s.get('p50_ms')} ms, p99 {s.get('p99_ms')} ms, max {s.get('max_ms')} ms"
        f" (GET /health: p50 {hl.get('p50_ms')} ms, p99 {hl.get('p99_ms')} ms)",
        "GET /health rounds: " + ", ".join(f"{r['rate']:,.0f}" for r in health_runs) + " req/s"
        f" ({before} before the deliveries, {len(health_runs) - before} after)",
        f"at the last answer {at_last[1]} of {at_last[0]} stored events were still unapplied; the worker applied"
        f" {distinct} events in {check['first_received_to_last_handled_s']} s from the first received;"
        f" received->handled p50 {check['received_to_handled'].get('p50_ms')} ms,"
        f" max {check['received_to_handled'].get('max_ms')} ms",
        "CPU ms per delivery while storing: " + ", ".join(
            f"{k} {v}" for k, v in store_cpu.per_item_ms(n).items() if v >= 0.01)
        + "; after the last answer (per event): " + ", ".join(
            f"{k} {v}" for k, v in tail_cpu.per_item_ms(distinct).items() if v >= 0.01),
        "CPU ms per GET /health: " + ", ".join(f"{k} {v}" for k, v in hl["cpu_ms_per_request"].items() if v >= 0.01),
        f"outcomes: {', '.join(f'{k} {v}' for k, v in check['outcomes'].items())};"
        f" answers duplicate=true: {store.duplicates} (re-deliveries sent: {deliveries.redeliveries})",
    ]
    problems = []
    if store.errors:
        problems.append(f"{len(store.errors)} deliveries not answered 200, e.g. {store.errors[:2]}")
    if check["rows"] != distinct or check["rows_of_this_run"] != distinct:
        problems.append(f"stripe_events holds {check['rows']} rows ({check['rows_of_this_run']} of this run's"
                        f" events), expected {distinct}")
    if check["unhandled"]:
        problems.append(f"{check['unhandled']} events still unhandled after {args.timeout:.0f} s")
    if check["attempts_not_1"]:
        problems.append(f"{check['attempts_not_1']} events with attempts != 1 (applied twice, or failed)")
    if check["with_last_error"]:
        problems.append(f"{check['with_last_error']} events with a last_error")
    if store.duplicates != deliveries.redeliveries:
        notes.append(f"{store.duplicates} answers said duplicate for {deliveries.redeliveries} re-deliveries"
                     " (a re-delivery that overtook its first delivery is the one stored)")
    notes += [f"WARNING: {p}" for p in problems]
    if not problems:
        notes.append(f"verified: {distinct} rows in stripe_events, all handled, attempts = 1 for every one")
    if {"postgres", "redis"} - set(roots):
        notes.append("servers from BENCH_DATABASE_URL / BENCH_REDIS_URL: their CPU is not counted")
    others = [r["others_cpu_share"] for r in health_runs] + [store_cpu.others_share]
    if max(others) > 0.1:
        notes.append("other processes on this machine used " + ", ".join(f"{x:.0%}" for x in others[:-1])
                     + f" of its CPUs during the GET /health rounds and {others[-1]:.0%} during the deliveries:"
                     " the figures are noisier than on a quiet machine")
    print_table("webhook", rows, params, notes)
    result = {"params": params, "rows": [r.as_dict() for r in rows], "store": s,
              "store_cpu_ms_per_delivery": store_cpu.per_item_ms(n),
              "tail_cpu_ms_per_event": tail_cpu.per_item_ms(distinct),
              "health_runs": health_runs, "applied_after_last_s": round(applied_s, 3),
              "unapplied_at_last_answer": at_last[1], "last_answer_epoch": round(last_answer_wall, 3),
              "others_cpu_share_store": round(store_cpu.others_share, 3), "verification": check, "problems": problems,
              "notes": notes}
    write_results("webhook", result)
    return result


if __name__ == "__main__":
    main()
