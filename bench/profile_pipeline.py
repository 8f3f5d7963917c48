"""Where a task's time goes, phase by phase, in one process (no HTTP server, no worker pool).

The API side: POST /api/tasks/create through `falcon.testing` on `create_app` (the same
middleware, auth, session and after-commit enqueue as under gunicorn). The worker side:
the steps of `worker.tasks.run_ai_task` called one by one (lease, start, inputs +
processor, complete, release) with the benchmark's no-op processor, then the whole
`run_ai_task` under cProfile. Per phase: wall ms, SQL statements, connection checkouts
(each one a pre-ping round trip with `pool_pre_ping`), and time inside the database
driver.

    python -m bench.profile_pipeline [-n 100] [--top 25]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import time
import uuid
from collections import defaultdict
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event

from .common import JWT_SECRET, bench_env, make_token, sigterm_as_exit, write_results
from .processors import OVERRIDES


class SqlMeter:
    """Counts statements, checkouts and driver time on an engine, attributed to a phase."""

    def __init__(self, engine):
        self.phase = "other"
        self.stats: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)
        event.listen(engine.pool, "checkout", self._checkout)
        self._started = 0.0
        self.recording: list[str] | None = None

    def _before(self, conn, cursor, statement, params, context, many):
        self._started = time.perf_counter()

    def _after(self, conn, cursor, statement, params, context, many):
        s = self.stats[self.phase]
        s["statements"] += 1
        s["db_ms"] += (time.perf_counter() - self._started) * 1000
        if self.recording is not None:
            self.recording.append(f"[{self.phase.strip()}] " + " ".join(statement.split())[:160])

    def _checkout(self, *args):
        self.stats[self.phase]["checkouts"] += 1
        if self.recording is not None:
            self.recording.append(f"[{self.phase.strip()}] (pool checkout: pre-ping round trip)")

    @contextmanager
    def timed(self, phase: str, wall: dict[str, list[float]]):
        previous, self.phase = self.phase, phase
        began = time.perf_counter()
        try:
            yield
        finally:
            wall[phase].append((time.perf_counter() - began) * 1000)
            self.phase = previous


def table(wall: dict[str, list[float]], meter: SqlMeter, items: int) -> list[dict[str, Any]]:
    rows = []
    for phase, values in wall.items():
        s = meter.stats.get(phase, {})
        rows.append({"phase": phase, "mean_ms": round(statistics.fmean(values), 3),
                     "p50_ms": round(statistics.median(values), 3),
                     "statements": round(s.get("statements", 0) / items, 2),
                     "checkouts": round(s.get("checkouts", 0) / items, 2),
                     "db_ms": round(s.get("db_ms", 0) / items, 3)})
    return rows


def print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n== {title} (per task) ==")
    print(f"{'phase':38} {'mean ms':>8} {'p50 ms':>8} {'stmts':>6} {'checkouts':>9} {'in driver ms':>12}")
    for r in rows:
        print(f"{r['phase']:38} {r['mean_ms']:8.2f} {r['p50_ms']:8.2f} {r['statements']:6.1f}"
              f" {r['checkouts']:9.1f} {r['db_ms']:12.2f}")


def profile_text(profile: cProfile.Profile, top: int, sort: str) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats(sort).print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.profile_pipeline")
    p.add_argument("-n", type=int, default=100, help="tasks (default 100)")
    p.add_argument("--top", type=int, default=25, help="cProfile lines to print (default 25)")
    p.add_argument("--sort", default="cumulative", help="cProfile order: cumulative or tottime (default cumulative)")
    p.add_argument("--show-sql", action="store_true", help="print the statements of one submit and one task")
    args = p.parse_args(argv)
    sigterm_as_exit()
    n = args.n

    with bench_env("profile") as env:
        # The worker modules read Settings.from_env() at import (worker.app) and in runtime.
        os.environ.update(env.process_env(PROCESSOR_OVERRIDES=OVERRIDES))
        from falcon import testing

        from api.app import create_app
        from models.billing import change_plan
        from models.db import session_scope
        from settings import Settings
        from worker import runtime
        from worker import tasks as worker_tasks
        from worker.queue import TaskQueue, create_celery

        settings = Settings.from_env()
        assert settings.jwt_secret == JWT_SECRET
        engine = runtime.engine()  # the worker's engine, as configured in worker/runtime.py
        meter = SqlMeter(engine)

        class TimedQueue(TaskQueue):
            def send(self, task_type, task_id):
                with meter.timed("  after-commit: celery send_task", api_wall):
                    super().send(task_type, task_id)

        celery = create_celery(settings)
        queue = TimedQueue(celery)
        app = create_app(settings, engine=engine, queue=queue)
        client = testing.TestClient(app)
        api_wall: dict[str, list[float]] = defaultdict(list)

        users = []
        for _ in range(max(1, n // 20 + 1)):
            token = make_token(f"prof_{uuid.uuid4().hex[:10]}")
            user = client.simulate_post("/api/users/initialize", headers={"Authorization": f"Bearer {token}"}).json
            uid = uuid.UUID(user["user"]["id"])
            with session_scope(runtime.sessions()) as session:
                change_plan(session, uid, "enterprise")
                from models.uploads import add_upload

                key = f"uploads/{uid}/in"
                (env.media_root / "uploads" / str(uid)).mkdir(parents=True, exist_ok=True)
                (env.media_root / key).write_bytes(b"x")
                upload = add_upload(session, uid, filename="in.png", content_type="image/png", size=1,
                                    sha256="0" * 64, storage_key=key)
                session.flush()
                users.append((token, upload.id))

        # Warm-up (imports, compiled-statement cache, pool), not measured.
        for token, upload_id in users[:1]:
            r = client.simulate_post("/api/tasks/create", headers={"Authorization": f"Bearer {token}"},
                                     json={"type": "image_analysis", "input": str(upload_id)})
            worker_tasks.run_ai_task(None, r.json["task"]["id"])
        from api.auth import TokenVerifier

        verifier = TokenVerifier(settings)

        # --- API: submit ---------------------------------------------------------------
        ids = []
        api_profile = cProfile.Profile()
        for i in range(n):
            if i == n - 1:
                meter.recording = []
            token, upload_id = users[i % len(users)]
            with meter.timed("  JWT verify (again, outside the app)", api_wall):
                verifier.verify(token)
            with meter.timed("POST /api/tasks/create (whole request)", api_wall):
                api_profile.enable()
                r = client.simulate_post("/api/tasks/create", headers={"Authorization": f"Bearer {token}"},
                                         json={"type": "image_analysis", "input": str(upload_id)})
                api_profile.disable()
            assert r.status_code == 201, r.json
            ids.append(r.json["task"]["id"])
        api_sql, meter.recording = meter.recording or [], None
        api_rows = table(api_wall, meter, n)
        print_rows("API submit, in process", api_rows)

        # Drain the real broker messages we just sent; this process plays the worker.
        from kombu import Connection

        with Connection(settings.broker_url) as conn:
            for q in ("image_analysis",):
                conn.default_channel.queue_purge(q)

        # --- worker: run_ai_task step by step -----------------------------------------------
        from models.leases import task_lease
        from models.tasks import complete_task, start_task

        worker_wall: dict[str, list[float]] = defaultdict(list)
        half = n // 2
        for index, tid_text in enumerate(ids[:half]):
            if index == half - 1:
                meter.recording = []
            tid = uuid.UUID(tid_text)
            # The steps of run_ai_task, one by one, on the lease's connection as it runs them.
            with meter.timed("run_ai_task (sum of the steps)", worker_wall):
                with meter.timed("  lease: connect + pg_try_advisory_lock", worker_wall):
                    lease_cm = task_lease(runtime.engine(), tid, wait_seconds=worker_tasks.LEASE_WAIT_SECONDS)
                    lease = lease_cm.__enter__()
                assert lease is not None
                with meter.timed("  start_task transaction (lock, charge)", worker_wall):
                    with lease.session() as session:
                        work = start_task(session, tid, may_resume=True)
                with meter.timed("  _process: inputs + no-op processor", worker_wall):
                    output = worker_tasks._process(work, lease)
                with meter.timed("  complete_task (one conditional UPDATE)", worker_wall):
                    with lease.session() as session:
                        complete_task(session, tid, output)
                with meter.timed("  lease: unlock + close", worker_wall):
                    lease_cm.__exit__(None, None, None)
        worker_sql, meter.recording = meter.recording or [], None
        # The rest through the real function, to check the steps add up, and for cProfile.
        worker_profile = cProfile.Profile()
        for tid_text in ids[half:]:
            with meter.timed("run_ai_task (the real function)", worker_wall):
                worker_profile.enable()
                assert worker_tasks.run_ai_task(None, tid_text) == "completed"
                worker_profile.disable()
        worker_rows = table(worker_wall, meter, max(half, 1))
        real = next(r for r in worker_rows if r["phase"].startswith("run_ai_task (the real"))
        for key in ("statements", "checkouts", "db_ms"):  # measured over the other half
            real[key] = round(meter.stats["run_ai_task (the real function)"].get(key, 0) / (n - half), 3)
        print_rows("worker run_ai_task, in process", worker_rows)

        if args.show_sql:
            print("\n== SQL of one submit ==\n" + "\n".join(api_sql))
            print("\n== SQL of one task in the worker ==\n" + "\n".join(worker_sql))
        print("\n== cProfile: POST /api/tasks/create ==")
        api_text = profile_text(api_profile, args.top, args.sort)
        print(api_text)
        print("\n== cProfile: run_ai_task ==")
        worker_text = profile_text(worker_profile, args.top, args.sort)
        print(worker_text)
        runtime.engine().dispose()
        celery.close()

    result = {"tasks": n, "api": api_rows, "worker": worker_rows, "api_sql": api_sql, "worker_sql": worker_sql, "api_cprofile": api_text,
              "worker_cprofile": worker_text}
    write_results("profile_pipeline", result)
    return result


if __name__ == "__main__":
    main()
