"""Private PostgreSQL and Redis servers that a test may stop, kill and start again.

The suite's shared servers (conftest `servers`, or the machine's) are never touched: each
server here runs from its own temporary directory on a free port, and `close()` stops it
and removes the directory. A test that cannot start one (no binaries, initdb refused)
skips with the reason.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import redis

from devenv.embedded import free_port, redis_server_binary
from tests.support.web import stop_process

# --- PostgreSQL ----------------------------------------------------------------------------------


def postgres_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin that has initdb and pg_ctl."""
    def version(path: str) -> tuple[int, ...]:
        return tuple(int(part) for part in Path(path).parts[-3].split(".") if part.isdigit())

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version, reverse=True)
    for initdb in found:
        bin_dir = Path(initdb).parent
        if (bin_dir / "pg_ctl").exists():
            return bin_dir
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


class PrivatePostgres:
    """A PostgreSQL cluster of its own (trust auth, 127.0.0.1:<port>). fsync is off: an
    immediate shutdown kills the server's processes, not the machine, so what they wrote is
    still in the OS's cache and crash recovery finds it.

    initdb refuses to run as root, so as root every server command runs as the `postgres`
    user (`runuser`) on a data directory it owns; as any other user, as that user.
    """

    def __init__(self, bin_dir: Path, base: Path):
        self.bin_dir, self.base = bin_dir, base
        self.data = base / "data"
        self.sockets = base / "sockets"
        self.log = base / "postgres.log"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/studiox"

    # -- lifecycle

    @classmethod
    def create(cls) -> PrivatePostgres:
        """Make, start and return a new cluster with an empty `studiox` database; skip the
        test if this machine cannot."""
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
        if os.geteuid() == 0 and not shutil.which("runuser"):
            pytest.skip("running as root without runuser: cannot run initdb as the postgres user")
        base = Path(tempfile.mkdtemp(prefix="studiox-private-pg-"))
        server = cls(bin_dir, base)
        try:
            server._initdb()
            server.start()
            server._psql_admin("CREATE DATABASE studiox")
        except BaseException as exc:
            server.close()
            if isinstance(exc, Exception):
                pytest.skip(f"cannot start a private PostgreSQL: {exc}")
            raise  # a skip from _initdb, or an interrupt
        return server

    def _run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        command = list(args)
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=self.base)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({result.returncode}): "
                               f"{(result.stderr or result.stdout).strip()[-800:]}")
        return result

    def _initdb(self) -> None:
        self.sockets.mkdir()
        if os.geteuid() == 0:
            import pwd

            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no postgres user to run initdb as")
            os.chmod(self.base, 0o755)
            for path in (self.base, self.sockets):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self._run(str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--no-sync", "-E", "UTF8", "--locale=C")

    def start(self, timeout: float = 30) -> None:
        options = (f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c full_page_writes=off -c shared_buffers=16MB -c max_connections=120")
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
                  "-w", "-t", str(int(timeout)), "start", timeout=timeout + 10)

    def stop(self, mode: str = "fast", timeout: float = 30) -> None:
        """`pg_ctl stop -m <mode>`: smart, fast (sessions ended, then a checkpoint) or
        immediate (processes killed, crash recovery at the next start)."""
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", str(int(timeout)),
                  "stop", timeout=timeout + 10)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def running(self) -> bool:
        return self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "status", check=False).returncode == 0

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.data.exists() and self.running():
                self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    def _psql_admin(self, sql: str) -> None:
        from sqlalchemy import create_engine, text

        admin = create_engine(self.url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(sql))
        finally:
            admin.dispose()

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


@pytest.fixture
def private_postgres():
    server = PrivatePostgres.create()
    try:
        yield server
    finally:
        server.close()


# --- Redis -----------------------------------------------------------------------------------------


class PrivateRedis:
    """A redis-server of its own on 127.0.0.1:<port>, keeping nothing on disk: killed and
    started again, it comes back empty on the same port."""

    def __init__(self, binary: str, base: Path):
        self.binary, self.base = binary, base
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @classmethod
    def create(cls) -> PrivateRedis:
        try:
            binary = redis_server_binary()
        except Exception as exc:
            pytest.skip(f"cannot start a private redis-server: {exc}")
        server = cls(binary, Path(tempfile.mkdtemp(prefix="studiox-private-redis-")))
        try:
            server.start()
        except Exception as exc:
            server.close()
            pytest.skip(f"cannot start a private redis-server: {exc}")
        return server

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 15) -> None:
        args = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.base),
                "--save", "", "--appendonly", "no", "--protected-mode", "yes",
                "--logfile", str(self.base / "redis.log")]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.exceptions.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server did not start on port {self.port}; "
                                           f"see {self.base / 'redis.log'}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: everything it held (queued and unacknowledged messages) is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        stop_process(self.process)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def private_redis():
    server = PrivateRedis.create()
    try:
        yield server
    finally:
        server.close()


# --- Celery beat -----------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


class CeleryBeat:
    """A real `celery beat` process with its schedule file under `workdir`."""

    def __init__(self, env: dict[str, str], workdir: Path, log_path: Path | None = None):
        self.env, self.workdir = env, workdir
        self.log_path = log_path or workdir / "beat.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> CeleryBeat:
        import sys

        self.workdir.mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.app", "beat", "-s", str(self.workdir / "beat-schedule"),
             "--pidfile=", "-l", "info"],
            cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        out.close()
        return self

    def stop(self, timeout: float = 10) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


# --- the service on such servers ------------------------------------------------------------------


class Service:
    """The processes of a deployment on `settings`: the API (real gunicorn), a Celery worker
    on every queue with the timed stand-in processors, and beat. `env` adds variables to
    all three (beat intervals, sweep ages, time limits). `close()` stops each."""

    def __init__(self, settings, workdir: Path, *, concurrency: int = 2, **env: str):
        from tests.support.env import worker_env
        from tests.support.processors import OVERRIDES

        self.settings, self.workdir, self.concurrency = settings, workdir, concurrency
        self.env = worker_env(settings, PROCESSOR_OVERRIDES=OVERRIDES, **env)
        self.web = self.worker = self.beat = None

    def start(self) -> Service:
        from tests.support.web import Gunicorn
        from tests.support.workers import CeleryWorker
        from worker.queue import create_celery

        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.worker = CeleryWorker(self.env, concurrency=self.concurrency, log_path=self.workdir / "worker.log")
            self.worker.start(create_celery(self.settings))
            self.beat = CeleryBeat(self.env, self.workdir).start()
            self.web = Gunicorn(self.env, workers=1, log_path=self.workdir / "gunicorn.log").start()
        except BaseException:
            self.close()
            raise
        return self

    def alive(self) -> bool:
        return all(p is not None and p.process.poll() is None for p in (self.web, self.worker, self.beat))

    def request(self, method: str, path: str, *, headers: dict[str, str] | None = None, json_body=None,
                timeout: float = 30) -> tuple[int, dict, float]:
        """(status, JSON body or {}, seconds taken) of one request to the API."""
        import json

        body = None if json_body is None else json.dumps(json_body).encode()
        headers = {**(headers or {}), **({"Content-Type": "application/json"} if body is not None else {})}
        began = time.monotonic()
        status, _, payload = self.web.request(method, path, body=body, headers=headers, timeout=timeout)
        elapsed = time.monotonic() - began
        try:
            parsed = json.loads(payload) if payload else {}
        except ValueError:
            parsed = {"raw": payload[:500].decode(errors="replace")}
        return status, parsed, elapsed

    def logs(self, lines: int = 60) -> str:
        out = []
        for name in ("worker.log", "beat.log", "gunicorn.log"):
            with contextlib.suppress(OSError):
                text = (self.workdir / name).read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {name}\n" + "\n".join(text))
        return "\n".join(out)

    def close(self) -> None:
        for process in (self.web, self.beat, self.worker):
            if process is not None:
                with contextlib.suppress(Exception):
                    process.stop()


class Member:
    """A user on a plan with credits and an uploaded input file, acting through `service`."""

    def __init__(self, service: Service, session_factory, *, plan: str = "enterprise", credits: int = 100):
        import uuid

        import jwt

        from models.db import session_scope
        from models.uploads import add_upload
        from tests.support.builders import make_user

        self.service = service
        with session_scope(session_factory) as s:
            user = make_user(s, plan=plan, plan_credits=credits)
            self.id, clerk_id = user.id, user.clerk_id
            key = f"uploads/{user.id}/{uuid.uuid4()}"
            path = service.settings.media_root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"input-bytes")
            self.upload = str(add_upload(s, user.id, filename="in.bin", content_type="application/octet-stream",
                                         size=11, sha256="0" * 64, storage_key=key).id)
        now = int(time.time())
        token = jwt.encode({"sub": clerk_id, "iat": now, "nbf": now - 1, "exp": now + 3600},
                           service.settings.jwt_secret, algorithm="HS256")
        self.headers = {"Authorization": f"Bearer {token}"}

    def submit(self, sleep: float = 0.0, timeout: float = 30) -> tuple[int, dict, float]:
        return self.service.request("POST", "/api/tasks/create", headers=self.headers, timeout=timeout,
                                    json_body={"type": "image_analysis", "input": self.upload,
                                               "params": {"sleep": sleep}})

    def task(self, task_id: str) -> tuple[int, dict, float]:
        return self.service.request("GET", f"/api/tasks/{task_id}", headers=self.headers)


def task_outcomes(session_factory) -> dict[str, str]:
    """Every task's id and status, once all are final; money checked on the way: each task
    charged at most once, completed means charged once and not refunded, failed or
    cancelled means refunded exactly what was charged, and `models.audit.run_checks`
    finds no violation of any invariant."""
    from sqlalchemy import select

    from models import AiTask
    from models.audit import run_checks
    from models.tasks import FINAL_STATUSES
    from tests.support.ledger import charges, refunds

    outcomes = {}
    with session_factory() as s:
        for task in s.scalars(select(AiTask)):
            assert task.status in FINAL_STATUSES, (task.id, task.status)
            charged, refunded = len(charges(s, task.id)), len(refunds(s, task.id))
            assert charged <= 1 and refunded <= charged, (task.id, charged, refunded)
            if task.status == "completed":
                assert (charged, refunded) == (1, 0), (task.id, task.status, charged, refunded)
            else:
                assert refunded == charged, (task.id, task.status, charged, refunded)
            outcomes[str(task.id)] = task.status
        assert list(run_checks(s)) == []
    return outcomes
