"""`make run` end to end: embedded servers, every Procfile process, the banner's token, and
a Ctrl-C that leaves nothing behind.

The test runs `make run` as a terminal would (its own session, Ctrl-C delivered to the
whole foreground process group) with a temporary STUDIOX_VAR_DIR. Every process it starts
inherits STUDIOX_VAR_DIR, so /proc/<pid>/environ finds them all, including the ones that
left the group (honcho's children, Redis, PostgreSQL each run in a session of their own).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from devenv.embedded import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parent.parent
BANNER_TIMEOUT = 120
STOP_TIMEOUT = 30
BANNER_END = "Ctrl-C stops every process."
# What the caller's environment must not decide for this test.
SCRUBBED = ("DATABASE_URL", "REDIS_URL", "BROKER_URL", "REDIS_PORT", "APP_ENV", "BIND_HOST", "FLOWER_BASIC_AUTH",
            "MEDIA_ROOT", "JWT_JWKS_URL", "JWT_PUBLIC_KEY", "JWT_ISSUER", "JWT_AUTHORIZED_PARTIES", "JWT_ADMIN_CLAIM",
            "MAKEFLAGS", "MFLAGS", "MAKELEVEL")


class MakeRun:
    def __init__(self, env: dict[str, str]):
        self.lines: list[str] = []
        self.banner_seen = threading.Event()
        self.process = subprocess.Popen(
            ["make", "run"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        # Keep draining: a full pipe would block honcho's printer and with it every process.
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            if BANNER_END in line:
                self.banner_seen.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_banner(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while not self.banner_seen.wait(0.2):
            if self.process.poll() is not None:
                pytest.fail(f"make run exited with {self.process.returncode} before the banner:\n{self.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no banner within {timeout}s:\n{self.tail()}")
        return self.output

    def interrupt(self) -> None:
        """Ctrl-C as a terminal sends it: to every process of the foreground group."""
        os.killpg(self.process.pid, signal.SIGINT)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.lines[-n:])


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def processes_started_by(var_dir: Path, ports: list[int]) -> dict[int, str]:
    """Live processes (pid -> command line) carrying this run's STUDIOX_VAR_DIR in their
    environment, or naming its var dir or one of its ports on their command line."""
    marker = f"STUDIOX_VAR_DIR={var_dir}".encode()
    port_words = [w for p in ports for w in (f"--port={p}", f"--port {p}", f"127.0.0.1:{p}")]
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        stat = _read(entry / "stat").decode(errors="replace")
        if not stat or stat.rsplit(")", 1)[1].split()[0] == "Z":
            continue  # gone, or a zombie: exited, only waiting for its parent to reap it
        cmdline = _read(entry / "cmdline").replace(b"\0", b" ").decode(errors="replace").strip()
        environ = _read(entry / "environ").split(b"\0")
        if marker in environ or str(var_dir) in cmdline or any(w in cmdline for w in port_words):
            found[int(entry.name)] = cmdline
    return found


def _kill_leftovers(var_dir: Path, ports: list[int]) -> None:
    for pid in processes_started_by(var_dir, ports):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_run_serves_the_banner_token_and_ctrl_c_leaves_nothing_behind(tmp_path):
    var_dir = (tmp_path / "var").resolve()
    port, flower_port = free_port(), free_port()
    while flower_port == port:
        flower_port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    env.update(STUDIOX_VAR_DIR=str(var_dir), PORT=str(port), FLOWER_PORT=str(flower_port),
               STUDIOX_DOTENV=os.devnull)  # a developer's .env must not point elsewhere
    http = requests.Session()
    http.trust_env = False  # loopback, never through a proxy

    run = MakeRun(env)
    redis_port: int | None = None
    try:
        banner = run.wait_for_banner(BANNER_TIMEOUT)
        token = re.search(r"token:\s+(\S+)", banner).group(1)
        api_url = re.search(r"API\s+(http://\S+)", banner).group(1)
        flower_url = re.search(r"Flower\s+(http://\S+)", banner).group(1)
        flower_user, flower_password = re.search(r"login (\S+?):(\S+)", banner).groups()
        redis_port = int(re.search(r"Broker\s+redis://127\.0\.0\.1:(\d+)/", banner).group(1))
        assert api_url == f"http://127.0.0.1:{port}"
        assert flower_url == f"http://127.0.0.1:{flower_port}"
        assert f'curl -H "Authorization: Bearer {token}" {api_url}/api/users/me' in banner

        health = http.get(f"{api_url}/health", timeout=10)
        assert health.status_code == 200, health.text
        me = http.get(f"{api_url}/api/users/me", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert me.status_code == 200, me.text
        assert me.json()["user"]["clerkId"] == "dev-user"

        # The CLI in another terminal of the checkout finds the embedded servers (DATABASE_URL unset).
        cli_env = {k: v for k, v in env.items() if k not in ("DATABASE_URL", "REDIS_URL", "APP_ENV")}
        shown = subprocess.run([str(Path(sys.executable).with_name("studiox")), "users", "show", "dev-user"],
                               env=cli_env, capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0 and "clerk dev-user" in shown.stdout, shown.stdout + shown.stderr

        assert http.get(flower_url, timeout=10).status_code == 401
        dashboard = http.get(flower_url, auth=(flower_user, flower_password), timeout=10)
        assert dashboard.status_code == 200, dashboard.text[:500]

        ports = [port, flower_port, redis_port]
        running = processes_started_by(var_dir, ports)
        commands = " | ".join(running.values())
        # The detector sees what it must later see gone.
        for program in ("gunicorn", "celery -A worker.app worker", "celery -A worker.app beat",
                        "worker.flower", "redis-server", "postgres", "devenv.run"):
            assert program in commands, f"{program} not found among {commands}"

        run.interrupt()
        try:
            run.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"make run still running {STOP_TIMEOUT}s after Ctrl-C:\n{run.tail()}")
        run.reader.join(10)

        deadline = time.monotonic() + 5
        while (left := processes_started_by(var_dir, ports)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"left behind after Ctrl-C: {left}"
        assert not (var_dir / "services.env").exists()  # the CLI no longer finds stopped servers

        output = run.output
        assert "studiox | stopping Redis" in output and "studiox | stopping PostgreSQL" in output
        assert "studiox | stopped" in output
        # make dies of the SIGINT it received itself; an "Error" line would mean devenv.run failed.
        assert not re.search(r"make: \*\*\* .*Error", output), run.tail()
    finally:
        if run.process.poll() is None:
            os.killpg(run.process.pid, signal.SIGKILL)
            run.process.wait()
        _kill_leftovers(var_dir, [p for p in (port, flower_port, redis_port) if p])


def test_the_events_port_never_takes_flowers():
    from devenv.run import events_port

    api = free_port()
    assert events_port({}, "127.0.0.1", api, taken=(api + 1,)) not in (api, api + 1)
    assert events_port({"EVENTS_PORT": "9123"}, "127.0.0.1", api) == 9123
