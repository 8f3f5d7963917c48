"""GET /api/tasks/{id} requests per second, against GET /health under the same gunicorn.

One gunicorn (`api.app:wsgi()`, gevent workers, as gunicorn.conf.py) serves both; the same load generator
with the same number of keep-alive connections and the same duration runs against each
in turn, on loopback. The load generator is `wrk` when it is installed (it costs the
2-core box far less CPU than Python does) and a Python client otherwise: one thread per
connection, each with its own kept-alive http.client connection. `--generator python` forces the latter.

Task reads go round-robin over several users' own tasks (each with its owner's token), so
the route does its real work: verify the JWT, load the user, load the task by id and owner,
serialize it. The tasks are pending (no worker runs), as the ones a frontend polls are.

    python -m bench.http [--quick] [--duration S] [--connections C] [--http-workers W]
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import ExitStack
from typing import Any

import requests

from .common import (
    RESULTS_DIR,
    CpuMeter,
    LoadResult,
    Row,
    bench_env,
    create_users,
    print_table,
    python_load,
    sigterm_as_exit,
    start_gunicorn,
    wrk_available,
    wrk_load,
    write_results,
)

TARGET = 0.6


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.http", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="4 s per measurement unless --duration is given")
    p.add_argument("--duration", type=float, help="seconds per measurement (default 10, 4 with --quick)")
    p.add_argument("--connections", type=int, default=8, help="concurrent keep-alive connections (default 8)")
    p.add_argument("--http-workers", type=int, default=2, help="gunicorn -w (default 2)")
    p.add_argument("--http-threads", type=int, default=4, help="gunicorn --threads with gthread (default 4)")
    p.add_argument("--http-worker-class", default="gevent", help="gunicorn -k (default gevent, as gunicorn.conf.py)")
    p.add_argument("--users", type=int, default=8, help="users whose tasks are read (default 8)")
    p.add_argument("--tasks-per-user", type=int, default=4, help="(default 4)")
    p.add_argument("--rounds", type=int, default=3,
                   help="measurements per endpoint, alternating; median (default 3: one round swings by 30%%)")
    p.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto",
                   help="load generator (default: wrk if installed, else python)")
    # `python -m bench` passes its extra options to every benchmark; each takes its own.
    args, ignored = p.parse_known_args(argv)
    if ignored:
        print(f"{p.prog}: ignoring options it does not take: {' '.join(ignored)}", flush=True)
    args.duration = args.duration or (4.0 if args.quick else 10.0)
    return args


def measure(base_url: str, targets: list[tuple[str, dict[str, str]]], args, tool: str, scratch) -> LoadResult:
    """One bounded measurement. Python: connection i starts at target i, round-robin."""
    if tool == "wrk":
        return wrk_load(base_url, targets, concurrency=args.connections, duration=args.duration, threads=2,
                        scratch=scratch)
    return python_load(lambda i: [(base_url + p, h) for p, h in targets[i % len(targets):] + targets[:i % len(targets)]],
                       concurrency=args.connections, duration=args.duration)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    sigterm_as_exit()
    tool = args.generator
    notes: list[str] = []
    if tool == "auto":
        tool = "wrk" if wrk_available() else "python"
        if tool == "python":
            notes.append("wrk not installed: Python load generator (it competes with gunicorn for the CPUs;"
                         " `apt-get install wrk` for a lighter one)")
    elif tool == "wrk" and not wrk_available():
        raise SystemExit("wrk is not installed; use --generator python")
    logs = RESULTS_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"http: {args.duration:g}s per measurement, {args.connections} connections, {tool}; starting servers...",
          flush=True)

    with bench_env("http") as env, ExitStack() as procs:
        gunicorn, base_url = start_gunicorn(env, workers=args.http_workers, threads=args.http_threads,
                                            worker_class=args.http_worker_class,
                                            log_path=logs / "http-gunicorn.log")
        procs.callback(gunicorn.stop)
        users = create_users(env, base_url, args.users, plan="enterprise")
        task_targets: list[tuple[str, dict[str, str]]] = []
        with requests.Session() as http:
            for _ in range(args.tasks_per_user):
                for user in users:
                    r = http.post(f"{base_url}/api/tasks/create", headers=user.headers, timeout=10,
                                  json={"type": "image_analysis", "input": str(user.upload_id), "params": {}})
                    r.raise_for_status()
                    task_targets.append((f"/api/tasks/{r.json()['task']['id']}", user.headers))
            # Every target answers 200 before anything is timed.
            for path, headers in task_targets:
                assert http.get(base_url + path, headers=headers, timeout=10).status_code == 200
        endpoints = {
            "health": [("/health", {})],
            "task": task_targets,
            "plans": [("/api/billing/plans", {})],
        }
        roots = {"api": gunicorn.popen.pid, **env.server_pids}

        # Warm-up: every gunicorn thread's connections and compiled statements.
        warm = argparse.Namespace(**{**vars(args), "duration": 1.0})
        for targets in endpoints.values():
            measure(base_url, targets, warm, tool, env.scratch)

        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in endpoints}
        for round_no in range(args.rounds):
            for name, targets in endpoints.items():
                with CpuMeter(roots) as cpu:
                    result = measure(base_url, targets, args, tool, env.scratch)
                summary = result.summary()
                if hasattr(result, "wrk_latency"):
                    summary.update(result.wrk_latency)
                summary["cpu_ms_per_request"] = cpu.per_item_ms(max(result.requests, 1))
                runs[name].append(summary)
                print(f"http: round {round_no + 1}: {name} {result.rate:,.0f} req/s"
                      f" ({result.errors} errors)", flush=True)
                time.sleep(0.5)

    rate = {name: statistics.median(r["rate"] for r in rs) for name, rs in runs.items()}
    rows = [
        Row("GET /api/tasks/{id} vs GET /health", rate["task"], rate["health"], "req/s", TARGET),
        Row("GET /api/billing/plans vs GET /health (info)", rate["plans"], rate["health"], "req/s"),
    ]
    params = {"generator": tool, "connections": args.connections, "duration_s": args.duration,
              "rounds": args.rounds, "gunicorn": f"-w {args.http_workers} -k {args.http_worker_class}",
              "task_targets": len(task_targets), "users": args.users}
    for name in ("task", "health", "plans"):
        last = runs[name][-1]
        cpu = last["cpu_ms_per_request"]
        notes.append(f"{name}: p50 {last.get('p50_ms')} ms, p95 {last.get('p95_ms')} ms, errors {last['errors']};"
                     " CPU ms/request " + ", ".join(f"{k} {v}" for k, v in cpu.items() if v >= 0.01))
    errors = sum(r["errors"] for rs in runs.values() for r in rs)
    if errors:
        notes.append(f"{errors} non-2xx or failed requests were not counted")
    if {"postgres", "redis"} - set(roots):
        notes.append("servers from BENCH_DATABASE_URL / BENCH_REDIS_URL: their CPU is not counted")
    print_table("http", rows, params, notes)
    result = {"params": params, "rows": [r.as_dict() for r in rows], "runs": runs, "notes": notes}
    write_results("http", result)
    return result


if __name__ == "__main__":
    main()
