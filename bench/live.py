"""Waiting for a task: `Prefer: wait` submissions against submit-then-poll, and the idle
Server-Sent Events streams one `events` process holds.

submissions: N no-op tasks (bench.processors via PROCESSOR_OVERRIDES) submitted by C client
          threads, each on its own kept-alive http.client connection and its own enterprise
          user; a thread submits one task and follows it until it sees the final state,
          then submits the next. Both sides use the same gunicorn (gunicorn.conf.py, gevent,
          WAIT_MAX_PER_PROCESS above C) and the same Celery worker, rounds alternating.
  ours:     one `POST /api/tasks/create` with `Prefer: wait=30`, answered with the final
            task (Preference-Applied checked; an answer that is not final is followed by
            `GET /api/tasks/{id}` with the same preference, and counted).
  baseline: plain `POST /api/tasks/create`, then `GET /api/tasks/{id}` every 250 ms from
            the answer until the task is final (the seed frontend's way).
  Reported: completed tasks/s (from the common start to the last thread's last final
  state), latency from submit to seeing the final state (p50, p95), HTTP requests per
  task, CPU per task of each process.
streams:  the `events` process as the Procfile runs it (one gevent worker,
          --worker-connections EVENTS_CONNECTIONS), K streams opened from this process
          (non-blocking sockets on one selector: GET with the bearer token, read until the
          stream's first `queue` event, then the socket is only kept open) on K pending
          tasks nobody processes (admitted in the database, no message sent, no worker).
          Each must answer `200 text/event-stream`. Then the worker's RSS and its CPU over
          a few idle seconds, against the same process warmed up with no stream open.
          A second events process with EVENTS_KEEPALIVE_SECONDS=2 checks that a
          `: keep-alive` comment arrives on a sample of streams.

    python -m bench.live [--quick] [-n N] [--clients C] [--streams K]
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import resource
import selectors
import socket
import statistics
import sys
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from http.client import HTTPConnection, HTTPException
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from celery import Celery
from sqlalchemy import text

from .common import (
    RESULTS_DIR,
    BenchUser,
    CpuMeter,
    Env,
    Process,
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

FINAL = ("completed", "failed", "cancelled", "expired")
POLL_SECONDS = 0.25
WAIT_SECONDS = 30
TASK_TYPE = "image_analysis"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.live", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller N, K and fewer rounds")
    p.add_argument("-n", "--tasks", type=int, help="tasks per side per round (default 300, 80 with --quick)")
    p.add_argument("--clients", type=int, default=16, help="client threads, one user and connection each (default 16)")
    p.add_argument("--rounds", type=int, help="rounds per side, alternating, median reported (default 3, 1 with --quick)")
    p.add_argument("--concurrency", "-c", type=int, default=4, help="Celery worker -c (default 4)")
    p.add_argument("--http-workers", type=int, default=2, help="gunicorn -w of the API (default 2)")
    p.add_argument("--streams", "-k", type=int, help="idle event streams to open (default 1000, 200 with --quick)")
    p.add_argument("--events-connections", type=int,
                   help="the events process's EVENTS_CONNECTIONS (default 2000, 300 with --quick)")
    p.add_argument("--idle-seconds", type=float, default=5.0, help="CPU measured over this long while idle (default 5)")
    p.add_argument("--keepalive-sample", type=int, default=20, help="streams checked for a keep-alive (default 20)")
    p.add_argument("--loglevel", default="info", help="the worker's -l (default info, as in the Procfile)")
    # `python -m bench` passes its extra options to every benchmark; each takes its own.
    args, ignored = p.parse_known_args(argv)
    if ignored:
        print(f"{p.prog}: ignoring options it does not take: {' '.join(ignored)}", flush=True)
    args.tasks = args.tasks or (80 if args.quick else 300)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.streams = args.streams if args.streams is not None else (200 if args.quick else 1000)
    args.events_connections = args.events_connections or (300 if args.quick else 2000)
    if args.tasks < args.clients:
        p.error("-n must be at least --clients")
    if args.streams < 10:
        p.error("--streams must be at least 10")
    if args.streams >= args.events_connections:
        p.error("--streams must stay below --events-connections (the warm-up holds a few connections too)")
    return args


# --- submissions ------------------------------------------------------------------------------


@dataclass
class SideRun:
    side: str
    tasks: int
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    requests: int = 0
    not_final: int = 0  # wait answers that were not final (the wait ran out or was not applied)
    not_applied: int = 0  # wait answers without Preference-Applied
    statuses: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    task_ids: list[str] = field(default_factory=list, repr=False)

    @property
    def rate(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        done = len(self.latencies_ms)
        out: dict[str, Any] = {
            "side": self.side, "tasks": self.tasks, "final_seen": done, "seconds": round(self.seconds, 3),
            "rate": round(self.rate, 1), "requests": self.requests,
            "requests_per_task": round(self.requests / done, 2) if done else 0.0,
            "final_statuses": dict(self.statuses), "errors": len(self.errors)}
        if self.latencies_ms:
            out["submit_to_final"] = percentiles(self.latencies_ms)
        if self.side == "wait":
            out.update(not_final=self.not_final, not_applied=self.not_applied)
        if self.errors:
            out["error_samples"] = self.errors[:3]
        return out


def run_side(base_url: str, users: list[BenchUser], n: int, clients: int, side: str) -> SideRun:
    """Task i is submitted by thread i % clients (user i % clients); each thread follows its
    task to the final state before submitting the next. The clock runs from the common
    start to the last thread's last final state."""
    url = urlsplit(base_url)
    run = SideRun(side, n)
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)
    ends: list[float] = []

    def work(t: int) -> None:
        user = users[t % len(users)]
        body = json.dumps({"type": TASK_TYPE, "input": str(user.upload_id), "params": {}}).encode()
        post_headers = {**user.headers, "Content-Type": "application/json"}
        get_headers = dict(user.headers)
        if side == "wait":
            post_headers["Prefer"] = get_headers["Prefer"] = f"wait={WAIT_SECONDS}"
        lat: list[float] = []
        ids: list[str] = []
        errors: list[str] = []
        statuses: dict[str, int] = {}
        requests_made = not_final = not_applied = 0
        http = HTTPConnection(url.hostname, url.port, timeout=WAIT_SECONDS + 30)
        try:
            http.request("GET", "/health")  # connect before the clock
            http.getresponse().read()
        finally:
            barrier.wait()

        def call(method: str, path: str, payload: bytes | None, headers: dict[str, str]):
            nonlocal requests_made
            requests_made += 1
            http.request(method, path, body=payload, headers=headers)
            r = http.getresponse()
            return r, r.read()

        try:
            for _ in range(t, n, clients):
                began = time.perf_counter()
                try:
                    r, data = call("POST", "/api/tasks/create", body, post_headers)
                    if r.status != 201:
                        errors.append(f"POST {r.status} {data[:200]!r}")
                        continue
                    task = json.loads(data)["task"]
                    if side == "wait":
                        if r.getheader("Preference-Applied") != f"wait={WAIT_SECONDS}":
                            not_applied += 1
                        if task["status"] not in FINAL:
                            not_final += 1
                    next_poll = time.perf_counter() + POLL_SECONDS
                    while task["status"] not in FINAL:
                        if side == "poll":
                            pause = next_poll - time.perf_counter()
                            if pause > 0:
                                time.sleep(pause)
                            next_poll += POLL_SECONDS  # setInterval: every 250 ms, not 250 ms after each answer
                        r, data = call("GET", f"/api/tasks/{task['id']}", None, get_headers)
                        if r.status != 200:
                            raise RuntimeError(f"GET {r.status} {data[:200]!r}")
                        task = json.loads(data)["task"]
                    lat.append((time.perf_counter() - began) * 1000)
                    ids.append(task["id"])
                    statuses[task["status"]] = statuses.get(task["status"], 0) + 1
                except (OSError, HTTPException, RuntimeError, ValueError, KeyError) as exc:
                    errors.append(repr(exc))
                    http.close()  # reconnects on the next request
        finally:
            end = time.perf_counter()
            http.close()
            with lock:
                run.latencies_ms.extend(lat)
                run.task_ids.extend(ids)
                run.errors.extend(errors)
                run.requests += requests_made
                run.not_final += not_final
                run.not_applied += not_applied
                for k, v in statuses.items():
                    run.statuses[k] = run.statuses.get(k, 0) + v
                ends.append(end)

    threads = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(clients)]
    for th in threads:
        th.start()
    barrier.wait()
    began = time.perf_counter()
    for th in threads:
        th.join()
    run.seconds = max(ends) - began
    return run


# --- the events process -------------------------------------------------------------------------


def start_events(env: Env, *, connections: int, log_path: Path, extra_env: dict[str, str] | None = None,
                 timeout: float = 60) -> tuple[Process, str]:
    """The Procfile's `events` line: `gunicorn --config gunicorn.conf.py 'api.app:wsgi()'
    --bind ... --workers 1 --worker-connections N --no-control-socket`."""
    from devenv.embedded import free_port

    port = free_port()
    proc = Process(
        [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", "api.app:wsgi()",
         "--bind", f"127.0.0.1:{port}", "--workers", "1", "--worker-connections", str(connections),
         "--no-control-socket"],
        env.process_env(**(extra_env or {})), log_path,
    ).start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except requests.RequestException:
            pass
        if not proc.alive() or time.monotonic() > deadline:
            tail = proc.log_tail()
            proc.stop()
            raise RuntimeError(f"the events process did not become healthy:\n{tail}")
        time.sleep(0.1)


def worker_pid(master: int) -> int:
    """The one gunicorn worker of `master`."""
    for _ in range(100):
        kids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                raw = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(raw[raw.rindex(")") + 2:].split()[1]) == master:
                kids.append(int(entry))
        if len(kids) == 1:
            return kids[0]
        time.sleep(0.1)
    raise RuntimeError(f"gunicorn {master} has no single worker")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def admit_pending(env: Env, users: list[BenchUser], count: int, per_user: int) -> list[tuple[uuid.UUID, BenchUser]]:
    """`count` pending tasks admitted as the API admits them (models.submit_task), their
    messages never sent: nobody will process them, so their streams stay idle."""
    from models.db import make_session_factory, session_scope
    from models.admission import submit_task
    from models.users import lock_user

    sessions = make_session_factory(env.engine, send_task=lambda task_type, task_id: None)
    out = []
    for i in range(count):
        user = users[(i // per_user) % len(users)]
        with session_scope(sessions) as session:
            task, _ = submit_task(session, lock_user(session, user.id), TASK_TYPE, str(user.upload_id), {})
            out.append((task.id, user))
    return out


@dataclass
class Stream:
    sock: socket.socket
    request: bytes
    buf: bytearray = field(default_factory=bytearray)
    status: int = 0
    content_type: str = ""
    headers_at: float = 0.0
    settled_at: float = 0.0  # the first `queue` event arrived: the server side is subscribed and idle
    keepalive_at: float = 0.0
    error: str = ""


def _request(host: str, port: int, task_id: uuid.UUID, token: str) -> bytes:
    return (f"GET /api/tasks/{task_id}/events HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n").encode()


def open_streams(base_url: str, targets: list[tuple[uuid.UUID, BenchUser]], *, window: int = 50,
                 want_keepalive: bool = False, timeout: float = 60) -> list[Stream]:
    """Open one stream per target from one thread (non-blocking sockets, one selector), at
    most `window` of them being set up at once; each is done once it answered its headers
    and its first `queue` event (or, with `want_keepalive`, a `: keep-alive` comment after
    that), or failed. The sockets of the streams are left open; the caller closes them."""
    url = urlsplit(base_url)
    host, port = url.hostname, url.port
    sel = selectors.DefaultSelector()
    streams: list[Stream] = []
    pending = list(reversed(targets))
    active = 0
    deadline = time.monotonic() + timeout

    def finish(s: Stream, error: str = "") -> None:
        nonlocal active
        s.error = s.error or error
        sel.unregister(s.sock)
        active -= 1

    try:
        while pending or active:
            while pending and active < window:
                task_id, user = pending.pop()
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                s = Stream(sock, _request(host, port, task_id, user.token))
                streams.append(s)
                code = sock.connect_ex((host, port))
                if code not in (0, errno.EINPROGRESS):
                    s.error = f"connect: {os.strerror(code)}"
                    continue
                sel.register(sock, selectors.EVENT_WRITE, s)
                active += 1
            if time.monotonic() > deadline:
                for key in list(sel.get_map().values()):
                    finish(key.data, "timed out")
                break
            for key, mask in sel.select(timeout=1.0):
                s: Stream = key.data
                try:
                    if mask & selectors.EVENT_WRITE:
                        sent = s.sock.send(s.request)
                        if sent < len(s.request):
                            s.request = s.request[sent:]
                            continue
                        sel.modify(s.sock, selectors.EVENT_READ, s)
                        continue
                    chunk = s.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    finish(s, repr(exc))
                    continue
                if not chunk:
                    finish(s, f"closed by the server after {bytes(s.buf[:200])!r}")
                    continue
                s.buf += chunk
                if not s.status:
                    head_end = s.buf.find(b"\r\n\r\n")
                    if head_end < 0:
                        continue
                    head = bytes(s.buf[:head_end]).decode("latin-1").split("\r\n")
                    s.status = int(head[0].split()[1])
                    for line in head[1:]:
                        name, _, value = line.partition(":")
                        if name.strip().lower() == "content-type":
                            s.content_type = value.strip()
                    s.headers_at = time.monotonic()
                    if s.status != 200 or not s.content_type.startswith("text/event-stream"):
                        finish(s, f"{s.status} {s.content_type}: {bytes(s.buf[head_end:head_end + 200])!r}")
                        continue
                if not s.settled_at:
                    if b"event: queue\n" in s.buf:
                        s.settled_at = time.monotonic()
                        del s.buf[:]
                    else:
                        continue
                if not want_keepalive:
                    finish(s)
                elif b": keep-alive\n" in s.buf:
                    s.keepalive_at = time.monotonic()
                    finish(s)
    finally:
        sel.close()
    return streams


def close_streams(streams: list[Stream]) -> None:
    for s in streams:
        try:
            s.sock.close()
        except OSError:
            pass


def raise_fd_limit(needed: int) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE (children inherit it) to `needed` if it is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# --- reporting ---------------------------------------------------------------------------------


@dataclass
class InfoRow(Row):
    """A measurement with no baseline of its own (the comparison is in the notes)."""

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "ours": round(self.ours, 2), "unit": self.unit, "ratio": None, "target": None}

    def cells(self) -> tuple[str, ...]:
        return (self.metric, f"{self.ours:,.1f} {self.unit}", "-", "-", "")


@dataclass
class LowerRow(Row):
    """Lower is better: the ratio is still ours / baseline (below 1 is the gain)."""

    def cells(self) -> tuple[str, ...]:
        return (self.metric, f"{self.ours:,.1f} {self.unit}", f"{self.baseline:,.1f} {self.unit}", f"{self.ratio:.2f}",
                "lower is better")


# --- the run -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    sigterm_as_exit()
    n, clients, k = args.tasks, args.clients, args.streams
    logs = RESULTS_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # This process holds K client sockets; the events process (which inherits the limit)
    # holds K more, plus its pool's and Redis's.
    fd_limit = raise_fd_limit(max(args.events_connections, k) + 512)
    print(f"live: N={n} tasks x {args.rounds} round(s) per side by {clients} clients, worker -c {args.concurrency};"
          f" then {k} idle event streams; starting servers...", flush=True)

    with bench_env("live") as env, ExitStack() as procs:
        client = Celery("bench_client", broker=env.redis_url, set_as_current=False)
        client.config_from_object("celeryconfig")
        procs.callback(client.close)
        redis_env = {"EVENTS_REDIS_URL": env.redis_url}  # as REDIS_URL already implies; said explicitly
        api, base_url = start_gunicorn(env, workers=args.http_workers, threads=1, log_path=logs / "live-gunicorn.log",
                                       extra_env={**redis_env, "WAIT_MAX_PER_PROCESS": str(max(200, 4 * clients))})
        procs.callback(api.stop)
        worker = start_celery_worker(
            "worker.app", queues="image_analysis,advanced_editing", concurrency=args.concurrency, name="bench-live",
            ping_app=client, loglevel=args.loglevel, env=env.process_env(PROCESSOR_OVERRIDES=OVERRIDES, **redis_env),
            log_path=logs / "live-worker.log")
        procs.callback(worker.stop)

        with env.engine.connect() as conn:
            limit = conn.execute(text("SELECT max_concurrent_tasks FROM plans WHERE id = 'enterprise'")).scalar()
        warm = 2 * clients
        per_thread = math.ceil((2 * n * args.rounds + 2 * warm) / clients) + 2
        user_count = max(clients, math.ceil(k / limit))
        users = create_users(env, base_url, user_count, plan="enterprise", min_credits=max(per_thread, limit) + 10)

        # -- 1. Prefer: wait against polling ----------------------------------------------------
        print("live: warming up (both sides)...", flush=True)
        for side in ("wait", "poll"):
            w = run_side(base_url, users, warm, clients, side)
            if w.errors:
                raise RuntimeError(f"warm-up ({side}): {len(w.errors)} errors, e.g. {w.errors[:3]}")
        roots = {"api": api.popen.pid, "worker": worker.popen.pid, **env.server_pids}
        runs: dict[str, list[dict[str, Any]]] = {"wait": [], "poll": []}
        latencies: dict[str, list[float]] = {"wait": [], "poll": []}
        for round_no in range(args.rounds):
            order = ("wait", "poll") if round_no % 2 == 0 else ("poll", "wait")
            for side in order:
                with CpuMeter(roots) as cpu:
                    r = run_side(base_url, users, n, clients, side)
                summary = r.summary()
                summary["cpu_ms_per_task"] = cpu.per_item_ms(max(len(r.latencies_ms), 1))
                runs[side].append(summary)
                latencies[side] += r.latencies_ms
                print(f"live: round {round_no + 1}: {side} {r.rate:.1f} tasks/s, {summary['requests_per_task']}"
                      f" requests/task, p50 {summary.get('submit_to_final', {}).get('p50_ms')} ms"
                      f" ({len(r.errors)} errors)", flush=True)
                time.sleep(0.3)
        # Quiet for the streams: neither the API nor the worker is needed any more.
        worker.stop()
        api.stop()

        # -- 2. idle event streams ------------------------------------------------------------
        print(f"live: admitting {k} pending tasks nobody will process...", flush=True)
        targets = admit_pending(env, users[:math.ceil(k / limit)], k, limit)
        events, events_url = start_events(env, connections=args.events_connections,
                                          log_path=logs / "live-events.log", extra_env=redis_env)
        procs.callback(events.stop)
        ka_events, ka_url = start_events(env, connections=100, log_path=logs / "live-events-keepalive.log",
                                         extra_env={**redis_env, "EVENTS_KEEPALIVE_SECONDS": "2"})
        procs.callback(ka_events.stop)
        events_worker = worker_pid(events.popen.pid)

        # Warm-up: the app's first request, the pool, the Redis subscription; then closed.
        warm_streams = open_streams(events_url, targets[:5])
        close_streams(warm_streams)
        if any(s.error for s in warm_streams):
            raise RuntimeError(f"warm-up streams failed: {[s.error for s in warm_streams if s.error][:3]}")
        time.sleep(2.0)
        rss0, master_rss0 = rss_kib(events_worker), rss_kib(events.popen.pid)
        fds0 = open_fds(events_worker)
        c0 = cpu_seconds(events_worker)
        time.sleep(args.idle_seconds / 2)
        idle_cpu0 = (cpu_seconds(events_worker) - c0) / (args.idle_seconds / 2)

        print(f"live: opening {k} event streams...", flush=True)
        began = time.monotonic()
        client_cpu0 = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        streams = open_streams(events_url, targets, timeout=120)
        procs.callback(close_streams, streams)
        open_seconds = time.monotonic() - began
        client_cpu = sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - client_cpu0
        held = [s for s in streams if not s.error and s.status == 200 and s.content_type.startswith("text/event-stream")
                and s.settled_at]
        failed = [s.error for s in streams if s.error]
        time.sleep(1.0)
        c1 = cpu_seconds(events_worker)
        time.sleep(args.idle_seconds)
        idle_cpu = (cpu_seconds(events_worker) - c1) / args.idle_seconds
        rss1, master_rss1 = rss_kib(events_worker), rss_kib(events.popen.pid)
        fds1 = open_fds(events_worker)
        still_open = sum(1 for s in held if _still_open(s.sock))
        print(f"live: {len(held)} of {k} streams held; worker RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB", flush=True)

        # Keep-alives on a sample, on the second events process (EVENTS_KEEPALIVE_SECONDS=2).
        sample = targets[:args.keepalive_sample]
        ka_began = time.monotonic()
        ka_streams = open_streams(ka_url, sample, want_keepalive=True, timeout=15)
        close_streams(ka_streams)
        ka_ok = [s for s in ka_streams if s.keepalive_at]
        ka_after = [s.keepalive_at - s.settled_at for s in ka_ok]
        ka_seconds = time.monotonic() - ka_began
        close_streams(streams)

    # -- the table -------------------------------------------------------------------------------
    wait_rate = statistics.median(r["rate"] for r in runs["wait"])
    poll_rate = statistics.median(r["rate"] for r in runs["poll"])
    wp, pp = percentiles(latencies["wait"]), percentiles(latencies["poll"])
    req = {side: sum(r["requests"] for r in rs) / max(1, sum(r["final_seen"] for r in rs)) for side, rs in runs.items()}
    mib = lambda kib: kib / 1024  # noqa: E731
    per_stream_kib = (rss1 - rss0) / len(held) if held else 0.0
    rows: list[Row] = [
        Row("completed submissions/s: Prefer: wait vs POST + poll 250 ms", wait_rate, poll_rate, "tasks/s"),
        LowerRow("submit -> final state seen, p50", wp["p50_ms"], pp["p50_ms"], "ms"),
        LowerRow("submit -> final state seen, p95", wp["p95_ms"], pp["p95_ms"], "ms"),
        LowerRow("HTTP requests per task", req["wait"], req["poll"], "req"),
        InfoRow(f"idle SSE streams held by one events process (of {k})", len(held), 0, "streams"),
        Row(f"events worker RSS: {len(held)} idle streams vs none", mib(rss1), mib(rss0), "MiB"),
        InfoRow("events worker RSS per idle stream", per_stream_kib, 0, "KiB"),
        InfoRow(f"events worker CPU while idle ({len(held)} streams, {args.idle_seconds:g} s)", 100 * idle_cpu, 0,
                "% of a core"),
    ]
    cpu_wait, cpu_poll = runs["wait"][-1]["cpu_ms_per_task"], runs["poll"][-1]["cpu_ms_per_task"]
    params = {"N": n, "rounds": args.rounds, "clients": clients, "users": user_count,
              "gunicorn": f"-w {args.http_workers} -k gevent (gunicorn.conf.py)",
              "worker": f"-c {args.concurrency} -P prefork, no-op processor", "prefer": f"wait={WAIT_SECONDS}",
              "poll_interval_ms": int(POLL_SECONDS * 1000), "streams": k,
              "events": f"--workers 1 --worker-connections {args.events_connections}",
              "fd_limit": fd_limit[0]}
    notes = [
        "rates per round (tasks/s): wait " + ", ".join(f"{r['rate']:.1f}" for r in runs["wait"])
        + "; poll " + ", ".join(f"{r['rate']:.1f}" for r in runs["poll"]),
        f"submit -> final (all rounds): wait p50 {wp['p50_ms']} / p95 {wp['p95_ms']} / max {wp['max_ms']} ms;"
        f" poll p50 {pp['p50_ms']} / p95 {pp['p95_ms']} / max {pp['max_ms']} ms",
        f"wait answers: {sum(r['not_applied'] for r in runs['wait'])} without Preference-Applied: wait={WAIT_SECONDS},"
        f" {sum(r['not_final'] for r in runs['wait'])} not final (followed by a GET with the same Prefer)",
        "CPU ms per task (last round), wait: " + ", ".join(f"{k_} {v}" for k_, v in cpu_wait.items() if v >= 0.05)
        + f" (sum {sum(cpu_wait.values()):.1f}); poll: "
        + ", ".join(f"{k_} {v}" for k_, v in cpu_poll.items() if v >= 0.05) + f" (sum {sum(cpu_poll.values()):.1f})",
        f"streams: {len(held)} answered 200 text/event-stream and their first `queue` event in {open_seconds:.1f} s"
        f" (client CPU {client_cpu:.2f} s); {still_open} still open after the idle period; worker fds {fds0} -> {fds1}",
        f"events worker RSS {mib(rss0):.1f} MiB with no stream -> {mib(rss1):.1f} MiB with {len(held)}"
        f" ({per_stream_kib:.1f} KiB each); master {mib(master_rss0):.1f} -> {mib(master_rss1):.1f} MiB;"
        f" CPU while idle {100 * idle_cpu0:.2f}% of a core with no stream, {100 * idle_cpu:.2f}% with"
        f" {len(held)} (keep-alive every 15 s: each stream re-reads the log then)",
        f"keep-alive (EVENTS_KEEPALIVE_SECONDS=2, second events process): arrived on {len(ka_ok)} of {len(sample)}"
        f" sampled streams, " + (f"{min(ka_after):.1f}-{max(ka_after):.1f} s after the first event" if ka_after
                                 else "none") + f" (check took {ka_seconds:.1f} s)",
    ]
    problems = []
    for side, rs in runs.items():
        errs = sum(r["errors"] for r in rs)
        if errs:
            problems.append(f"{side}: {errs} errors, e.g. {[e for r in rs for e in r.get('error_samples', [])][:2]}")
        bad = {s: c for r in rs for s, c in r["final_statuses"].items() if s != "completed"}
        if bad:
            problems.append(f"{side}: tasks not completed: {bad}")
    if sum(r["not_applied"] for r in runs["wait"]):
        problems.append("some wait answers lacked Preference-Applied")
    if len(held) < k:
        problems.append(f"{k - len(held)} of {k} streams not held, e.g. {failed[:3]}")
    if len(ka_ok) < len(sample):
        problems.append(f"keep-alive missing on {len(sample) - len(ka_ok)} of {len(sample)} sampled streams")
    if still_open < len(held):
        problems.append(f"{len(held) - still_open} streams were closed by the server while idle")
    notes += [f"WARNING: {p}" for p in problems]
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1):
        notes.append(f"load average {load:.1f} on {os.cpu_count()} CPUs at the end: other work shares this machine,"
                     " the figures are noisier than on a quiet one")
    print_table("live", rows, params, notes)
    result = {"params": params, "rows": [r.as_dict() for r in rows], "runs": runs,
              "latency": {"wait": wp, "poll": pp}, "requests_per_task": {s: round(v, 2) for s, v in req.items()},
              "streams": {"asked": k, "held": len(held), "open_seconds": round(open_seconds, 2),
                          "client_cpu_seconds": round(client_cpu, 3), "still_open": still_open,
                          "rss_kib": {"none": rss0, "held": rss1, "per_stream": round(per_stream_kib, 2)},
                          "master_rss_kib": {"none": master_rss0, "held": master_rss1},
                          "idle_cpu_share": {"none": round(idle_cpu0, 4), "held": round(idle_cpu, 4)},
                          "fds": {"none": fds0, "held": fds1}, "errors": failed[:5]},
              "keepalive": {"sample": len(sample), "arrived": len(ka_ok),
                            "after_first_event_s": [round(x, 2) for x in ka_after]},
              "problems": problems, "notes": notes}
    write_results("live", result)
    return result


def _still_open(sock: socket.socket) -> bool:
    """The server has not closed the stream (a peek reads nothing, or only keep-alives)."""
    try:
        data = sock.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return bool(data)


if __name__ == "__main__":
    main()
