"""`make run`: the whole service on a machine with only Python.

Unless DATABASE_URL / REDIS_URL (or BROKER_URL) point at running servers, it starts an
embedded PostgreSQL and Redis under ./var/ (STUDIOX_VAR_DIR), migrates, makes sure the
development user exists, and runs every Procfile process under honcho. The banner (API and
Flower URLs, a development token) is printed once GET /health answers 200.

Ctrl-C or SIGTERM stops the Procfile processes (honcho signals each one's process group,
so gunicorn workers and Celery pool children go too), then Redis, then PostgreSQL, and
exits 0. `--migrate-only` starts what it needs, migrates, and stops.
"""

from __future__ import annotations

import argparse
import errno
import os
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path

from honcho.environ import parse_procfile
from honcho.manager import Manager
from honcho.printer import Printer

ROOT = Path(__file__).resolve().parent.parent
DEV_CLERK_ID = "dev-user"
DEV_TOKEN_DAYS = 30
READY_TIMEOUT_SECONDS = 180


def say(message: str) -> None:
    print(f"studiox | {message}", flush=True)


class StartupError(Exception):
    """The environment cannot run the service; the message says what to change."""


class Interrupted(Exception):
    """A SIGINT/SIGTERM arrived while the servers were starting."""


class StopRequests:
    """Signal handler while starting up: the first signal lets the current step (initdb,
    a migration) finish and then stops cleanly; a second one interrupts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        say(f"{signal.Signals(signum).name} received; stopping after the current step")

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted


# --- environment -----------------------------------------------------------------------

def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        # As gunicorn and tornado do, so a socket in TIME_WAIT does not count as taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def _port(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name) or str(default)
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise StartupError(f"{name} must be a port number, got {raw!r}")
    return int(raw)


def check_ports(host: str, ports: dict[str, int]) -> None:
    for name, port in ports.items():
        if port_in_use(host, port):
            raise StartupError(
                f"port {port} ({name}) is already in use on {host}: stop whatever listens there, "
                f"or pick another port, e.g. `{name}={port + 1} make run`"
            )


# Under var/: the servers a running `make run` uses, for the CLI (cli/services.py).
SERVICES_FILE = "services.env"


def process_env(var_dir: Path) -> dict[str, str]:
    """The environment every Procfile process gets. Development defaults are filled in
    only where the real environment (or .env) says nothing."""
    env = dict(os.environ)
    env["STUDIOX_VAR_DIR"] = str(var_dir)
    env.setdefault("APP_ENV", "development")
    env.setdefault("PORT", "8000")
    env.setdefault("FLOWER_PORT", "5555")
    # The development JWT secret is public: keep the API and Flower off the network.
    env.setdefault("BIND_HOST", "127.0.0.1")
    env.setdefault("MEDIA_ROOT", str(var_dir / "media"))
    if not env.get("FLOWER_BASIC_AUTH") and env["APP_ENV"] == "development":
        env["FLOWER_BASIC_AUTH"] = f"admin:{secrets.token_urlsafe(12)}"
    elif not env.get("FLOWER_BASIC_AUTH"):
        # Flower would read an empty value as one empty credential and let nobody in.
        env.pop("FLOWER_BASIC_AUTH", None)
    # The Procfile's `gunicorn` and `celery` are this virtualenv's.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"  # log lines reach honcho as they are written
    return env


# --- startup steps ---------------------------------------------------------------------

# The development user may try every task type: a plan that allows them all, and credits to
# spend (topped up to DEV_CREDITS by an operator's ledger row whenever a run finds fewer than
# DEV_MIN_CREDITS; the pro plan's monthly 500 are usually enough).
DEV_PLAN = "pro"
DEV_CREDITS = 1000
DEV_MIN_CREDITS = 200


def ensure_dev_user(database_url: str, *, development: bool = True) -> bool:
    """The user the development token names; True when it was created just now. In
    development it is kept on a plan that allows every task type, with credits to spend."""
    from models.db import create_engine, make_session_factory, session_scope
    from models.credits import initialize_user

    engine = create_engine(database_url, pool_size=1, max_overflow=0)
    try:
        with session_scope(make_session_factory(engine)) as session:
            user, created = initialize_user(session, DEV_CLERK_ID, email="dev-user@example.com", name="Development user")
            if development:
                equip_dev_user(session, user)
        return created
    finally:
        engine.dispose()


def equip_dev_user(session, user) -> None:
    """Through the operator's own operations, so the ledger explains every credit."""
    from models.billing import change_plan
    from models.credits import adjust_credits
    from models.plans import get_plan
    from tasktypes import TASK_TYPE_SPECS

    plan = get_plan(session, user.plan_id)
    if not all(plan.allows(t) for t in TASK_TYPE_SPECS) and user.stripe_subscription_id is None:
        user = change_plan(session, user.id, DEV_PLAN, reason="operator")
        say(f"moved the development user to the {DEV_PLAN!r} plan (every task type)")
    if user.credits < DEV_MIN_CREDITS:
        adjust_credits(session, user.id, DEV_CREDITS - user.credits, bucket="purchased",
                       reason="make run: development credits")
        say(f"topped the development user up to {DEV_CREDITS} credits")


def dev_token(settings) -> str | None:
    """An HS256 token for the development user carrying the configured admin claim
    (JWT_ADMIN_CLAIM, `role=admin` by default), so operator routes can be tried too."""
    import jwt

    if not settings.jwt_secret:
        return None
    now = int(time.time())
    claims: dict = {"sub": DEV_CLERK_ID, "iat": now, "nbf": now, "exp": now + DEV_TOKEN_DAYS * 86400}
    path, _, value = settings.jwt_admin_claim.partition("=")
    *parents, leaf = path.split(".")
    node = claims
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value or True
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_authorized_parties:
        claims["azp"] = settings.jwt_authorized_parties[0]
    return jwt.encode(claims, settings.jwt_secret, algorithm="HS256")


def wait_until_ready(api_url: str, flower: tuple[str, int], stopping: threading.Event) -> bool:
    """True once GET /health answers 200 (then gives Flower a little while to listen)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while not stopping.is_set():
        try:
            with opener.open(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            return False
        stopping.wait(0.5)
    flower_deadline = time.monotonic() + 20
    while not stopping.is_set() and time.monotonic() < flower_deadline:
        try:
            socket.create_connection(flower, timeout=1).close()
            break
        except OSError:
            stopping.wait(0.5)
    return not stopping.is_set()


def events_port(env: dict[str, str], host: str, port: int, taken: tuple[int, ...] = ()) -> int:
    """EVENTS_PORT, or (unset) the API's port + 1, or a free one if that is taken (by another
    server, or by one of `taken`, e.g. Flower's port): the events process is an extra, and a
    developer's other server on 8001 should not stop `make run`."""
    if env.get("EVENTS_PORT"):
        return _port(env, "EVENTS_PORT", 8001)
    from devenv.embedded import free_port

    wanted = port + 1
    if wanted < 65536 and wanted not in taken and not port_in_use(host, wanted):
        return wanted
    return free_port()


def console_link(api_url: str, token: str | None) -> str:
    """The console's address; with a token, signed in (it reads `#token=` and keeps it in the tab)."""
    return f"{api_url}/#token={token}" if token else f"{api_url}/"


def banner(*, environment: str, api_url: str, flower_url: str, flower_auth: str | None, database: str, broker: str,
           token: str | None, events_url: str | None = None) -> str:
    rule = "─" * 78
    lines = [
        "", rule,
        f"  StudioX is running ({environment})",
        "",
        f"  API       {api_url}    (health: {api_url}/health)",
        # The token rides in the fragment, which the browser keeps to itself: no route serves it.
        f"  Console   {console_link(api_url, token)}",
        *([f"  Events    {events_url}/api/tasks/{{id}}/events    (Server-Sent Events)"] if events_url else []),
        f"  Flower    {flower_url}    " + (f"login {flower_auth}" if flower_auth else "(no authentication)"),
        f"  Database  {database}",
        f"  Broker    {broker}",
    ]
    if token:
        lines += [
            "",
            f"  Dev user  {DEV_CLERK_ID} (admin), bearer token valid {DEV_TOKEN_DAYS} days:",
            f"  token:    {token}",
            "",
            "  Try it:",
            f'  curl -H "Authorization: Bearer {token}" {api_url}/api/users/me',
        ]
    else:
        lines += ["", "  No development token: JWT_SECRET is not set (tokens come from your identity provider)."]
    lines += ["", "  Ctrl-C stops every process.", rule, ""]
    return "\n".join(lines) + "\n"


# --- the process manager ---------------------------------------------------------------

class StudioManager(Manager):
    """honcho's Manager, plus: a hook once every process runs, and a record of whether
    a signal is what stopped it.

    honcho's terminate() signals each process's group by the pid its shell reported;
    a Ctrl-C that lands before every pid has arrived makes it fail with a KeyError and
    leaves the processes running. So termination waits here until every pid is known."""

    def __init__(self, after_start: Callable[[], None], startup: StopRequests, **kwargs):
        super().__init__(**kwargs)
        self.after_start, self.startup = after_start, startup
        self.stopped_by_signal = False
        self._starting = True
        self._deferred = False

    def terminate(self):
        # loop() terminates once a process has stopped; before that, only a signal does.
        if not self._any_stopped():
            self.stopped_by_signal = True
        if self._starting:
            self._deferred = True
            return
        super().terminate()

    def _start(self):
        super()._start()
        deadline = time.monotonic() + 60
        while not self._all_started():
            self._handle(self.events.get(timeout=max(0.1, deadline - time.monotonic())))
        self._starting = False
        if self.startup.signum is not None:  # arrived before honcho's handlers did
            self.stopped_by_signal = self._deferred = True
        if self._deferred:
            self.terminate()
        else:
            self.after_start()

    def _handle(self, msg) -> None:
        """What loop() does with a message, for those that arrive while starting."""
        if msg.type == "line":
            self._printer.write(msg)
        elif msg.type == "start":
            self._processes[msg.name]["pid"] = msg.data["pid"]
            self._system_print(f"{msg.name} started (pid={msg.data['pid']})\n")
        elif msg.type == "stop":
            self._processes[msg.name]["returncode"] = msg.data["returncode"]
            self._system_print(f"{msg.name} stopped (rc={msg.data['returncode']})\n")
            if self.returncode is None:
                self.returncode = msg.data["returncode"]

    def failed(self) -> list[str]:
        """Processes that exited by themselves rather than from honcho's SIGTERM/SIGKILL."""
        return [f"{name} (rc={p['returncode']})" for name, p in self._processes.items()
                if p.get("returncode") not in (None, -signal.SIGTERM, -signal.SIGKILL)]

    def process_groups(self) -> list[int]:
        # honcho starts each process in a new session: its pid is its group's id.
        return [p["pid"] for p in self._processes.values() if p.get("pid")]


def _group_alive(pgid: int) -> bool:
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


def reap_groups(pgids: list[int], grace: float = 5.0) -> None:
    """A process that outlived its shell (honcho only signals groups whose shell still
    runs) gets SIGTERM, then SIGKILL: nothing `make run` started may be left behind."""
    left = [g for g in pgids if _group_alive(g)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pgid in left:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = [g for g in left if _group_alive(g)]
        if not left:
            return


def serve(env: dict[str, str], startup: StopRequests, banner_text: str, api_url: str,
          flower_address: tuple[str, int]) -> int:
    procfile = parse_procfile((ROOT / "Procfile").read_text())
    stopping = threading.Event()

    def announce_when_ready() -> None:
        if wait_until_ready(api_url, flower_address, stopping):
            sys.stdout.write(banner_text)
            sys.stdout.flush()
        elif not stopping.is_set():
            say(f"the API did not answer {api_url}/health with 200 within {READY_TIMEOUT_SECONDS}s; "
                "see the `web` lines above")

    def after_start() -> None:
        threading.Thread(target=announce_when_ready, name="ready", daemon=True).start()

    manager = StudioManager(after_start, startup, printer=Printer(sys.stdout))
    for name, command in procfile.processes.items():
        manager.add_process(name, command, env=env, cwd=str(ROOT))
    try:
        manager.loop()
    finally:
        stopping.set()
        reap_groups(manager.process_groups())
    if manager.stopped_by_signal:
        return 0
    say(f"{', '.join(manager.failed()) or 'a process'} stopped on its own (see its lines above), "
        "so every other one was stopped too")
    return 1


# --- main ------------------------------------------------------------------------------

def run(migrate_only: bool) -> int:
    from dotenv import load_dotenv

    from devenv.embedded import migrate, start_postgres, start_redis
    from settings import ConfigError, Settings, sqlalchemy_url

    # Real environment variables win over `.env`.
    load_dotenv(os.environ.get("STUDIOX_DOTENV", str(ROOT / ".env")), override=False)
    var_dir = Path(os.environ.get("STUDIOX_VAR_DIR") or ROOT / "var").resolve()
    env = process_env(var_dir)
    host = env["BIND_HOST"]
    port, flower_port = _port(env, "PORT", 8000), _port(env, "FLOWER_PORT", 5555)
    embedded_redis = not (env.get("REDIS_URL") or env.get("BROKER_URL"))
    check_host = host if host not in ("", "::") else "0.0.0.0"
    if not migrate_only:
        env["EVENTS_PORT"] = str(events_port(env, check_host, port, taken=(flower_port,)))
        ports = {"PORT": port, "FLOWER_PORT": flower_port, "EVENTS_PORT": int(env["EVENTS_PORT"])}
        if embedded_redis and env.get("REDIS_PORT"):
            ports["REDIS_PORT"] = _port(env, "REDIS_PORT", 6379)
        check_ports(check_host, ports)

    startup = StopRequests()
    signal.signal(signal.SIGINT, startup)
    signal.signal(signal.SIGTERM, startup)
    stops: list[tuple[str, Callable[[], None]]] = []
    try:
        var_dir.mkdir(parents=True, exist_ok=True)
        database = env.get("DATABASE_URL", "")
        if database:
            database_note = "(from DATABASE_URL)"
        else:
            say(f"starting embedded PostgreSQL in {var_dir / 'pg'}")
            pg = start_postgres(var_dir / "pg")
            stops.append(("PostgreSQL", pg.stop))
            env["DATABASE_URL"] = database = pg.url
            database_note = "(embedded)"
        startup.check()

        say("migrating the database (alembic upgrade head)")
        try:
            migrate(sqlalchemy_url(database))
        except Exception as exc:
            from sqlalchemy.exc import OperationalError

            if isinstance(exc, OperationalError):
                raise StartupError(f"cannot reach the database: {exc.orig}") from None
            raise
        startup.check()
        if migrate_only:
            say("migrations are up to date")
            return 0

        if embedded_redis:
            say(f"starting embedded Redis in {var_dir / 'redis'}")
            rd = start_redis(var_dir / "redis", _port(env, "REDIS_PORT", 6379) if env.get("REDIS_PORT") else None)
            stops.append(("Redis", rd.stop))
            env["REDIS_URL"] = rd.url
        broker_note = "(embedded)" if embedded_redis else ("(from BROKER_URL)" if env.get("BROKER_URL") else
                                                         "(from REDIS_URL)")
        startup.check()

        try:
            settings = Settings.from_env(env)
        except ConfigError as exc:
            raise StartupError(str(exc)) from None
        if ensure_dev_user(settings.database_url, development=settings.environment == "development"):
            say(f"created the development user {DEV_CLERK_ID!r}")
        startup.check()

        display_host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
        api_url = f"http://{display_host}:{port}"
        text = banner(
            environment=settings.environment,
            api_url=api_url,
            flower_url=f"http://{display_host}:{flower_port}",
            flower_auth=env.get("FLOWER_BASIC_AUTH"),
            database=f"{_without_password(database)} {database_note}",
            broker=f"{_without_password(settings.broker_url)} {broker_note}",
            token=dev_token(settings),
            events_url=f"http://{display_host}:{env['EVENTS_PORT']}",
        )
        # `.venv/bin/studiox` in another terminal finds these servers here (DATABASE_URL unset).
        services = var_dir / SERVICES_FILE
        services.write_text(f"# written by `make run` while it runs\nAPP_ENV={settings.environment}\n"
                            f"DATABASE_URL={settings.database_url}\nREDIS_URL={settings.broker_url}\n")
        services.chmod(0o600)
        stops.append(("the services file", lambda: services.unlink(missing_ok=True)))
        say("starting the Procfile processes: " + ", ".join(_procfile_names()))
        return serve(env, startup, text, api_url, (display_host, flower_port))
    except Interrupted:
        return 0
    except Exception:
        if startup.signum is None:
            raise
        # A Ctrl-C reaches initdb and pg_ctl too (same process group), which then fail.
        say("interrupted while starting")
        return 0
    finally:
        # Stopping PostgreSQL must not be cut short by an impatient second Ctrl-C.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: None)
        for name, stop in reversed(stops):
            say(f"stopping {name}")
            try:
                stop()
            except Exception:
                say(f"could not stop {name} cleanly:\n{traceback.format_exc()}")
        if stops or not migrate_only:
            say("stopped")


def _procfile_names() -> list[str]:
    return list(parse_procfile((ROOT / "Procfile").read_text()).processes)


def _without_password(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if not parts.password:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


def main(argv: list[str] | None = None) -> int:
    # pgserver keeps its lock under XDG_RUNTIME_DIR and says so at length when it is unset.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
    parser = argparse.ArgumentParser(prog="python -m devenv.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--migrate-only", action="store_true",
                        help="start the embedded PostgreSQL if needed, migrate, and stop")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    os.chdir(ROOT)
    try:
        return run(args.migrate_only)
    except StartupError as exc:
        say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
