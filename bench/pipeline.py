"""End-to-end tasks per second, against bare Celery on the same broker.

ours:     N tasks submitted over HTTP (POST /api/tasks/create to gunicorn serving the app)
          by several client threads, run by a real `celery -A worker.app` worker with a
          no-op processor (bench.processors via PROCESSOR_OVERRIDES). From the first
          submit to the last task's `completed_at`.
baseline: N sends of a no-op task of a bare Celery app (bench.bare_app, same
          celeryconfig) to a worker with the same -c, from the first send until the
          last task ran.
info row: our worker alone: N task rows admitted before the clock, their N messages sent
          as the baseline sends its own; until the last completes (no HTTP in the time).
info row: the floor: N POSTs to bench.skeleton_app under the same gunicorn (JSON body in,
          send_task, 201 with JSON out; no database, no auth) run by the bare worker. Any
          implementation of the design does at least this per task, so the floor's ratio
          to bare Celery bounds what the end-to-end row can reach on this machine.

Submissions are spread over enterprise users, each given at most its plan's in-flight
limit, so admission never answers 429 by design; any 429 is retried and reported.
Both sides get an untimed warm-up first (pool children fork, import, connect). Every
measurement also reports the CPU time per task of each process tree (API, worker,
PostgreSQL, Redis, this client): on a small machine the ratio follows from those.
For a per-phase breakdown of one task: `python -m bench.profile_pipeline --show-sql`.

    python -m bench.pipeline [--quick] [-n N] [--concurrency C] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from http.client import HTTPConnection, HTTPException
from typing import Any
from urllib.parse import urlsplit

import redis
from celery import Celery
from sqlalchemy import text

from . import bare_app
from .common import (
    RESULTS_DIR,
    BenchUser,
    CpuMeter,
    Env,
    Row,
    bench_env,
    create_users,
    percentiles,
    print_table,
    sigterm_as_exit,
    start_celery_worker,
    start_gunicorn,
    write_results,
)
from .processors import OVERRIDES

TARGET = 0.6
FINAL = ("completed", "failed", "cancelled")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="N=50 unless -n is given")
    p.add_argument("-n", "--tasks", type=int, help="tasks per measured round (default 200, 50 with --quick)")
    p.add_argument("--concurrency", "-c", type=int, default=4, help="Celery worker -c, both sides (default 4)")
    p.add_argument("--submitters", type=int, default=8, help="HTTP client threads submitting tasks (default 8)")
    p.add_argument("--http-workers", type=int, default=2, help="gunicorn -w (default 2)")
    p.add_argument("--http-threads", type=int, default=4, help="gunicorn --threads with gthread (default 4)")
    p.add_argument("--http-worker-class", default="gevent", help="gunicorn -k (default gevent, as gunicorn.conf.py)")
    p.add_argument("--rounds", type=int, default=5,
                   help="measured rounds per side, median reported (default 5: one round swings by 20%%)")
    p.add_argument("--type", default="image_analysis", choices=("image_analysis", "advanced_editing"),
                   help="task type submitted (default image_analysis)")
    p.add_argument("--loglevel", default="info", help="both workers' -l (default info, as in the Procfile)")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for a round to finish")
    # `python -m bench` passes its extra options to every benchmark; each takes its own.
    args, ignored = p.parse_known_args(argv)
    if ignored:
        print(f"{p.prog}: ignoring options it does not take: {' '.join(ignored)}", flush=True)
    args.tasks = args.tasks or (50 if args.quick else 200)
    return args


# --- ours ------------------------------------------------------------------------------


@dataclass
class SubmitStats:
    task_ids: list[uuid.UUID] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    too_many: int = 0
    errors: list[str] = field(default_factory=list)


def submit_tasks(base_url: str, users: list[BenchUser], n: int, task_type: str, threads: int) -> SubmitStats:
    """Task i goes to user i % len(users)."""
    bodies = [json.dumps({"type": task_type, "input": str(u.upload_id), "params": {}}).encode() for u in users]
    headers = [{**u.headers, "Content-Type": "application/json"} for u in users]
    return post_many(base_url, "/api/tasks/create", bodies, headers, n, threads)


def post_many(base_url: str, path: str, bodies: list[bytes], headers: list[dict[str, str]], n: int,
              threads: int) -> SubmitStats:
    """N POSTs, request i with bodies[i % len] and headers[i % len]; client thread t sends
    requests t, t+threads, ... and collects the `task.id` of each 201.

    The client is http.client on a kept-alive connection with bodies encoded before the
    clock: on a small machine every millisecond the load generator spends is taken from
    the API and the workers it measures (as `wrk` is used for the HTTP benchmark).
    """
    stats = SubmitStats()
    lock = threading.Lock()
    barrier = threading.Barrier(threads)
    url = urlsplit(base_url)

    def run(t: int) -> None:
        ids, lat, too_many, errors = [], [], 0, []
        http = HTTPConnection(url.hostname, url.port, timeout=30)
        http.request("GET", "/health")  # connect before the clock
        http.getresponse().read()
        barrier.wait()
        try:
            for i in range(t, n, threads):
                body, head = bodies[i % len(bodies)], headers[i % len(headers)]
                while True:
                    began = time.perf_counter()
                    try:
                        http.request("POST", path, body=body, headers=head)
                        r = http.getresponse()
                        data = r.read()
                    except (OSError, HTTPException) as exc:
                        errors.append(repr(exc))
                        http.close()
                        break
                    if r.status == 201:
                        lat.append((time.perf_counter() - began) * 1000)
                        ids.append(uuid.UUID(json.loads(data)["task"]["id"]))
                        break
                    if r.status == 429:
                        too_many += 1
                        time.sleep(0.02)
                        continue
                    errors.append(f"{r.status} {data[:200]!r}")
                    break
        finally:
            http.close()
        with lock:
            stats.task_ids += ids
            stats.latencies_ms += lat
            stats.too_many += too_many
            stats.errors += errors

    workers = [threading.Thread(target=run, args=(t,), daemon=True) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return stats


def wait_tasks(env: Env, ids: list[uuid.UUID], timeout: float) -> dict[str, Any]:
    """Poll until every task is final; return counts and the last completion time."""
    query = text(
        "SELECT count(*) FILTER (WHERE status = ANY(:final)), count(*) FILTER (WHERE status = 'completed'),"
        " extract(epoch FROM max(completed_at)) FROM ai_tasks WHERE id = ANY(:ids)"
    )
    deadline = time.monotonic() + timeout
    while True:
        with env.engine.connect() as conn:
            final, completed, last = conn.execute(query, {"ids": ids, "final": list(FINAL)}).one()
        if final >= len(ids):
            return {"final": final, "completed": completed, "last_completed": float(last or 0)}
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(ids) - final} of {len(ids)} tasks not final after {timeout:.0f}s")
        time.sleep(0.02)


def phases(env: Env, ids: list[uuid.UUID]) -> dict[str, Any]:
    """Where a task's time went, from its row: created (API, before commit) → started
    (worker, charged, before commit) → completed (worker, before commit)."""
    with env.engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT extract(epoch FROM started_at - created_at) * 1000,"
            " extract(epoch FROM completed_at - started_at) * 1000, status, error_code"
            " FROM ai_tasks WHERE id = ANY(:ids)"), {"ids": ids}).all()
    done = [r for r in rows if r[2] == "completed"]
    out: dict[str, Any] = {"failed": [f"{r[2]}:{r[3]}" for r in rows if r[2] != "completed"][:5]}
    if done:
        out["created_to_started"] = percentiles([float(r[0]) for r in done])
        out["started_to_completed"] = percentiles([float(r[1]) for r in done])
    return out


def run_ours(env: Env, base_url: str, users: list[BenchUser], args, n: int) -> dict[str, Any]:
    began = time.time()
    submit = submit_tasks(base_url, users, n, args.type, args.submitters)
    submitted = time.time()
    if submit.errors:
        raise RuntimeError(f"{len(submit.errors)} submissions failed, e.g. {submit.errors[:3]}")
    done = wait_tasks(env, submit.task_ids, args.timeout)
    seconds = done["last_completed"] - began
    return {
        "tasks": n, "completed": done["completed"], "seconds": round(seconds, 3),
        "rate": n / seconds if seconds > 0 else 0.0,
        "submit_seconds": round(submitted - began, 3), "submit_rate": round(n / (submitted - began), 1),
        "submit_latency": percentiles(submit.latencies_ms), "http_429": submit.too_many,
        "phases": phases(env, submit.task_ids),
    }


def admit_tasks(env: Env, users: list[BenchUser], task_type: str, n: int) -> list[uuid.UUID]:
    """N pending task rows, admitted by models.submit_task as the API would, not enqueued:
    the outbox's messages are collected here (the ids), and sent from one producer once the
    clock runs (run_ours_drain)."""
    from models.db import make_session_factory, session_scope
    from models.admission import submit_task
    from models.users import lock_user

    sessions = make_session_factory(env.engine, send_task=lambda task_type, task_id: None)
    ids: list[uuid.UUID] = []
    for i in range(n):
        user = users[i % len(users)]
        with session_scope(sessions) as session:
            task, _ = submit_task(session, lock_user(session, user.id), task_type, str(user.upload_id), {})
            ids.append(task.id)
    return ids


def run_ours_drain(env: Env, client: Celery, ids: list[uuid.UUID], args) -> dict[str, Any]:
    """Our worker alone: the admitted tasks' messages sent from one producer, as the
    baseline sends its own; until the last one completes."""
    began = time.time()
    with client.producer_or_acquire() as producer:
        for tid in ids:
            client.send_task(f"tasks.{args.type}", args=[str(tid)], producer=producer)
    done = wait_tasks(env, ids, args.timeout)
    seconds = done["last_completed"] - began
    return {"tasks": len(ids), "completed": done["completed"], "seconds": round(seconds, 3),
            "rate": len(ids) / seconds if seconds > 0 else 0.0}


# --- baseline --------------------------------------------------------------------------


def run_bare(client: Celery, r: redis.Redis, n: int, timeout: float) -> dict[str, Any]:
    r.delete(bare_app.COUNTER, bare_app.FINISHED_AT)
    began = time.time()
    with client.producer_or_acquire() as producer:
        for i in range(n):
            client.send_task("bench.noop", args=[i, n], queue=bare_app.QUEUE, producer=producer)
    sent = time.time()
    seconds = wait_bare(r, n, timeout, "bare Celery") - began
    return {"tasks": n, "seconds": round(seconds, 3), "rate": n / seconds, "send_seconds": round(sent - began, 3)}


def wait_bare(r: redis.Redis, n: int, timeout: float, label: str) -> float:
    """When the last of the bare worker's N no-op tasks ran (epoch seconds)."""
    deadline = time.monotonic() + timeout
    while (finished := r.get(bare_app.FINISHED_AT)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{label}: {int(r.get(bare_app.COUNTER) or 0)} of {n} ran in {timeout:.0f}s")
        time.sleep(0.02)
    return float(finished)


def run_skeleton(client: Celery, r: redis.Redis, base_url: str, n: int, threads: int, timeout: float) -> dict[str, Any]:
    """The floor: N POSTs to bench.skeleton_app (gunicorn + Falcon + send_task, no database)
    run by the bare worker; from the first POST until the last task ran."""
    r.delete(bare_app.COUNTER, bare_app.FINISHED_AT)
    body = json.dumps({"total": n}).encode()
    began = time.time()
    submit = post_many(base_url, "/submit", [body], [{"Content-Type": "application/json"}], n, threads)
    if submit.errors:
        raise RuntimeError(f"{len(submit.errors)} skeleton submissions failed, e.g. {submit.errors[:3]}")
    seconds = wait_bare(r, n, timeout, "skeleton") - began
    return {"tasks": n, "seconds": round(seconds, 3), "rate": n / seconds}


# --- the run ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    sigterm_as_exit()
    n, c = args.tasks, args.concurrency
    warm = 2 * c
    logs = RESULTS_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"pipeline: N={n} tasks x {args.rounds} round(s), worker -c {c}, starting servers...", flush=True)

    with bench_env("pipeline") as env, ExitStack() as procs:
        client = Celery("bench_client", broker=env.redis_url, set_as_current=False)
        client.config_from_object("celeryconfig")
        procs.callback(client.close)
        rds = redis.Redis.from_url(env.redis_url)
        procs.callback(rds.close)

        gunicorn, base_url = start_gunicorn(env, workers=args.http_workers, threads=args.http_threads,
                                            worker_class=args.http_worker_class,
                                            log_path=logs / "pipeline-gunicorn.log")
        procs.callback(gunicorn.stop)
        skeleton, skeleton_url = start_gunicorn(env, workers=args.http_workers, threads=args.http_threads,
                                                worker_class=args.http_worker_class,
                                                log_path=logs / "pipeline-skeleton.log",
                                                app="bench.skeleton_app:wsgi()",
                                                extra_env={"BENCH_BARE_BROKER": env.redis_url})
        procs.callback(skeleton.stop)
        ours_worker = start_celery_worker(
            # The Procfile's worker_media queues.
            "worker.app", queues="image_analysis,advanced_editing", concurrency=c, name="bench-ours",
            ping_app=client, loglevel=args.loglevel,
            env=env.process_env(PROCESSOR_OVERRIDES=OVERRIDES), log_path=logs / "pipeline-worker.log")
        procs.callback(ours_worker.stop)
        bare_worker = start_celery_worker(
            "bench.bare_app", queues=bare_app.QUEUE, concurrency=c, name="bench-bare", ping_app=client,
            loglevel=args.loglevel,
            env=env.process_env(BENCH_BARE_BROKER=env.redis_url), log_path=logs / "pipeline-bare.log")
        procs.callback(bare_worker.stop)

        # Enterprise users, each given at most its in-flight limit per round (no 429 by design).
        from tasktypes import spec_for

        with env.engine.connect() as conn:
            limit = conn.execute(text("SELECT max_concurrent_tasks FROM plans WHERE id = 'enterprise'")).scalar()
        user_count = max(1, math.ceil(n / limit))
        per_user = math.ceil((2 * n * args.rounds + warm) / user_count) * spec_for(args.type).price["base"]
        users = create_users(env, base_url, user_count, plan="enterprise", min_credits=per_user + 10)

        print("pipeline: warming up both workers...", flush=True)
        run_bare(client, rds, warm, args.timeout)
        run_skeleton(client, rds, skeleton_url, warm, args.submitters, args.timeout)
        run_ours(env, base_url, users, args, warm)

        roots = {"api": gunicorn.popen.pid, "api (skeleton)": skeleton.popen.pid, "worker (ours)": ours_worker.popen.pid,
                 "worker (bare)": bare_worker.popen.pid, **env.server_pids}
        ours_runs, bare_runs, drain_runs, floor_runs = [], [], [], []
        for round_no in range(args.rounds):
            with CpuMeter(roots) as cpu:
                bare_runs.append(run_bare(client, rds, n, args.timeout))
            bare_runs[-1]["cpu_ms_per_task"] = cpu.per_item_ms(n)
            with CpuMeter(roots) as cpu:
                floor_runs.append(run_skeleton(client, rds, skeleton_url, n, args.submitters, args.timeout))
            floor_runs[-1]["cpu_ms_per_task"] = cpu.per_item_ms(n)
            ids = admit_tasks(env, users, args.type, n)
            with CpuMeter(roots) as cpu:
                drain_runs.append(run_ours_drain(env, client, ids, args))
            drain_runs[-1]["cpu_ms_per_task"] = cpu.per_item_ms(n)
            with CpuMeter(roots) as cpu:
                ours_runs.append(run_ours(env, base_url, users, args, n))
            ours_runs[-1]["cpu_ms_per_task"] = cpu.per_item_ms(n)
            print(f"pipeline: round {round_no + 1}: ours {ours_runs[-1]['rate']:.1f}/s,"
                  f" our worker alone {drain_runs[-1]['rate']:.1f}/s, floor {floor_runs[-1]['rate']:.1f}/s,"
                  f" bare {bare_runs[-1]['rate']:.1f}/s", flush=True)

    ours_rate = statistics.median(x["rate"] for x in ours_runs)
    bare_rate = statistics.median(x["rate"] for x in bare_runs)
    drain_rate = statistics.median(x["rate"] for x in drain_runs)
    floor_rate = statistics.median(x["rate"] for x in floor_runs)
    rows = [Row("end-to-end tasks/s (noop processor)", ours_rate, bare_rate, "tasks/s", TARGET),
            Row("worker alone: pre-enqueued tasks/s (info)", drain_rate, bare_rate, "tasks/s"),
            Row("floor: HTTP submit + bare task, no DB (info)", floor_rate, bare_rate, "tasks/s"),
            Row("end-to-end vs that floor (info)", ours_rate, floor_rate, "tasks/s")]
    last = ours_runs[-1]
    params = {"N": n, "rounds": args.rounds, "worker_processes": 1, "worker_concurrency": c,
              "pool": "prefork", "submit_threads": args.submitters, "users": user_count,
              "gunicorn": f"-w {args.http_workers} -k {args.http_worker_class}", "task_type": args.type,
              "worker_loglevel": args.loglevel}
    ph = last["phases"]
    notes = [
        f"HTTP 429 answers retried: {sum(x['http_429'] for x in ours_runs)}"
        f" (users={user_count}, plan limit {limit} in flight each)",
        f"submit phase alone: {last['submit_rate']} tasks/s over HTTP; submit latency p50"
        f" {last['submit_latency']['p50_ms']} ms, p95 {last['submit_latency']['p95_ms']} ms",
    ]
    if "created_to_started" in ph:
        notes.append(f"per task (last round): created->started p50 {ph['created_to_started']['p50_ms']} ms"
                     f" (commit, enqueue, broker, queue wait, lease, charge); started->completed p50"
                     f" {ph['started_to_completed']['p50_ms']} ms (inputs, processor, complete)")
        notes.append(f"worker time per task implied by the rate: {1000 * c / ours_rate:.1f} ms per child"
                     f" (bare: {1000 * c / bare_rate:.1f} ms)")
    for label, cpu in (("end-to-end", last["cpu_ms_per_task"]), ("worker alone", drain_runs[-1]["cpu_ms_per_task"]),
                       ("floor", floor_runs[-1]["cpu_ms_per_task"]), ("bare", bare_runs[-1]["cpu_ms_per_task"])):
        notes.append(f"CPU ms per task, {label}: " + ", ".join(f"{k} {v}" for k, v in cpu.items() if v >= 0.05)
                     + f" (sum {sum(cpu.values()):.1f})")
    if rows[0].ratio < TARGET:
        notes.append(f"below target: it needs {TARGET * bare_rate:.0f} tasks/s, {TARGET * bare_rate / floor_rate:.2f} of"
                     " the no-database floor; `python -m bench.profile_pipeline --show-sql` breaks one task down")
    if ph.get("failed"):
        notes.append(f"tasks not completed: {ph['failed']}")
    if {"postgres", "redis"} - set(roots):
        notes.append("servers from BENCH_DATABASE_URL / BENCH_REDIS_URL: their CPU is not counted")
    print_table("pipeline", rows, params, notes)
    result = {"params": params, "rows": [r.as_dict() for r in rows], "ours_runs": ours_runs,
              "worker_alone_runs": drain_runs, "floor_runs": floor_runs, "bare_runs": bare_runs, "notes": notes}
    write_results("pipeline", result)
    return result


if __name__ == "__main__":
    main()
