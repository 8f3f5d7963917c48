"""Several machines on one: network namespaces ("hosts") on a private bridge.

`Network.create()` makes a Linux bridge in the test's own (root) namespace with the first
address of a free 10.213.X.0/24, and `add_host(role)` a namespace with a veth pair: one end
on the bridge, the other inside the namespace as `eth0` with the next address (and its own
`lo`). The hosts reach each other, and the test process reaches them all, over the bridge
and nothing else: a server bound to a host's address is unreachable from another host's
127.0.0.1. `Host.cut()` takes the host's end of the cable off the switch (the bridge-side
veth down: the host sees NO-CARRIER and its packets are dropped, as when a cable or a
switch port dies; nothing is refused, so TCP just retransmits), `Host.restore()` plugs it
back.

Only what this module made is touched: names carry the test's pid and a random part, every
process is started by it (`ip netns exec`), and `close()` ends the processes still in its
namespaces (by pid), deletes the namespaces and the bridge. The machine's own servers
(PostgreSQL on 5432, Redis on 6379) are in the root namespace and never seen from a host.

The data host's servers: `start_postgres` (initdb as the `postgres` user, started inside
the namespace listening on the host's address, trust for the private subnet only),
`start_redis` (no persistence) and `start_moto` (moto's S3 server).
"""

from __future__ import annotations

import contextlib
import glob
import http.client
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None if they can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    probe = f"sxprobe{os.getpid() % 100000}{secrets.token_hex(2)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` refused: {made.stderr.strip() or made.returncode}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    link = f"sxprb{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "link", "add", link, "type", "bridge"], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a bridge: {made.stderr.strip() or made.returncode}"
    subprocess.run(["ip", "link", "del", link], capture_output=True)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.213.X.0/24 that no interface or route of the machine uses (X starts at the pid)."""
    used = _ip("-4", "-o", "addr").stdout + _ip("-4", "route").stdout
    start = os.getpid() % 250
    for i in range(250):
        net = ipaddress.IPv4Network(f"10.213.{(start + i) % 250 + 1}.0/24")
        if f"10.213.{net.network_address.packed[2]}." not in used:
            return net
    raise RuntimeError("no free 10.213.X.0/24 subnet")


class Host:
    """A network namespace with one cable (veth) to the bridge."""

    def __init__(self, network: Network, role: str, ns: str, ip: str, link: str):
        self.network, self.role, self.ns, self.ip, self.link = network, role, ns, ip, link
        self.processes: list[subprocess.Popen] = []
        self.stoppers: list = []  # called first by stop_all (a server's own clean stop)

    def command(self, args: list[str], *, user: str | None = None) -> list[str]:
        prefix = ["ip", "netns", "exec", self.ns]
        return prefix + (["runuser", "-u", user, "--"] if user else []) + list(args)

    def run(self, args: list[str], *, user: str | None = None, timeout: float = 60,
            check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(self.command(args, user=user), capture_output=True, text=True, timeout=timeout,
                                cwd="/")
        if check and result.returncode != 0:
            raise RuntimeError(f"{self.role}: {' '.join(args[:2])} failed ({result.returncode}): "
                               f"{(result.stderr or result.stdout).strip()[-800:]}")
        return result

    def popen(self, args: list[str], *, env: dict[str, str], log_path: Path, cwd: Path = ROOT) -> subprocess.Popen:
        """Start a process on this host (its own session, output to `log_path`)."""
        with open(log_path, "ab") as out:
            process = subprocess.Popen(self.command(args), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.processes.append(process)
        return process

    def cut(self) -> None:
        """Unplug the host's cable: its end on the bridge goes down."""
        _ip("link", "set", self.link, "down")

    def restore(self) -> None:
        _ip("link", "set", self.link, "up")

    def pids(self) -> list[int]:
        """Every process in this namespace (all of them started here, by this module)."""
        result = _ip("netns", "pids", self.ns, check=False)
        return [int(p) for p in result.stdout.split()] if result.returncode == 0 else []

    def stop_all(self, timeout: float = 10) -> None:
        """SIGTERM to the processes started here, then SIGKILL to whatever is left in the
        namespace (forked servers, pool children), each by its pid."""
        for stop in reversed(self.stoppers):
            with contextlib.suppress(Exception):
                stop()
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
        deadline = time.monotonic() + timeout
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.1, deadline - time.monotonic()))
        for _ in range(3):
            left = self.pids()
            if not left:
                return
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.3)
        for process in self.processes:
            with contextlib.suppress(Exception):
                process.wait(1)


class Network:
    """A bridge in the root namespace and the hosts plugged into it."""

    def __init__(self, subnet: ipaddress.IPv4Network):
        self.tag = f"sx{os.getpid() % 100000}{secrets.token_hex(1)}"  # at most 9 characters
        self.subnet = subnet
        self.bridge = f"{self.tag}br"
        addresses = subnet.hosts()
        self.gateway = str(next(addresses))  # the test process's address on the bridge
        self._addresses = addresses
        self.hosts: list[Host] = []
        self._made_bridge = False

    @classmethod
    def create(cls) -> Network:
        network = cls(_free_subnet())
        try:
            _ip("link", "add", network.bridge, "type", "bridge")
            network._made_bridge = True
            _ip("addr", "add", f"{network.gateway}/{network.subnet.prefixlen}", "dev", network.bridge)
            _ip("link", "set", network.bridge, "up")
        except BaseException:
            network.close()
            raise
        return network

    def add_host(self, role: str) -> Host:
        """A namespace `<tag>-<role>` whose `eth0` is cabled to the bridge."""
        ip = str(next(self._addresses))
        ns, link = f"{self.tag}-{role}", f"{self.tag}{role[0]}{len(self.hosts)}"
        _ip("netns", "add", ns)
        host = Host(self, role, ns, ip, link)
        self.hosts.append(host)
        _ip("link", "add", link, "type", "veth", "peer", "name", f"{link}p")
        _ip("link", "set", f"{link}p", "netns", ns)
        _ip("link", "set", link, "master", self.bridge, "up")
        _ip("-n", ns, "link", "set", f"{link}p", "name", "eth0")
        _ip("-n", ns, "addr", "add", f"{ip}/{self.subnet.prefixlen}", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        return host

    def close(self) -> None:
        for host in reversed(self.hosts):
            with contextlib.suppress(Exception):
                host.stop_all()
            # Its veth pair goes with it (the end on the bridge too); a leftover end is deleted.
            _ip("netns", "del", host.ns, check=False)
            _ip("link", "del", host.link, check=False)
        if self._made_bridge:
            _ip("link", "del", self.bridge, check=False)

    def leftovers(self) -> list[str]:
        """Names of this network's namespaces and links still present (empty after close)."""
        names = _ip("netns", "list", check=False).stdout + _ip("-o", "link", check=False).stdout
        return [word for word in names.replace(":", " ").replace("@", " ").split() if word.startswith(self.tag)]


# --- the data host's servers ------------------------------------------------------------------------


def wait_port(ip: str, port: int, timeout: float, process: subprocess.Popen | None = None, what: str = "") -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((ip, port), timeout=1):
                return
        except OSError:
            if (process is not None and process.poll() is not None) or time.monotonic() > deadline:
                raise RuntimeError(f"{what or 'server'} did not listen on {ip}:{port}") from None
            time.sleep(0.1)


def postgres_bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]), reverse=True)
    for initdb in found:
        if (Path(initdb).parent / "pg_ctl").exists():
            return Path(initdb).parent
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).parent
    raise FileNotFoundError("no PostgreSQL server binaries (initdb, pg_ctl)")


def start_postgres(host: Host, port: int = 5432) -> str:
    """A new cluster (in a temporary directory the `postgres` user owns, removed when the
    host closes) run inside `host`, listening on its address; returns the URL of its
    `studiox` database (user postgres, trust from the private subnet only)."""
    import pwd

    from sqlalchemy import create_engine, text

    bin_dir = postgres_bin_dir()
    owner = pwd.getpwnam("postgres")
    base = temp_dir("studiox-multihost-pg-")
    host.stoppers.insert(0, lambda: shutil.rmtree(base, ignore_errors=True))  # after the stop below
    data, sockets = base / "data", base / "sockets"
    sockets.mkdir()
    os.chmod(base, 0o755)
    for path in (base, sockets):
        os.chown(path, owner.pw_uid, owner.pw_gid)
    host.run([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8",
              "--locale=C"], user="postgres")
    with open(data / "pg_hba.conf", "a") as hba:
        hba.write(f"host all all {host.network.subnet} trust\n")
    options = (f"-p {port} -k {sockets} -c listen_addresses={host.ip} -c fsync=off -c full_page_writes=off "
               "-c shared_buffers=16MB -c max_connections=100")
    host.run([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "postgres.log"), "-o", options, "-w",
              "-t", "30", "start"], user="postgres", timeout=45)
    host.stoppers.append(lambda: host.run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "10",
                                           "stop"], user="postgres", timeout=20, check=False))
    admin = create_engine(f"postgresql+psycopg://postgres@{host.ip}:{port}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text("CREATE DATABASE studiox"))
    finally:
        admin.dispose()
    return f"postgresql+psycopg://postgres@{host.ip}:{port}/studiox"


def start_redis(host: Host, base: Path, port: int = 6379) -> str:
    from devenv.embedded import redis_server_binary

    base.mkdir(parents=True, exist_ok=True)
    process = host.popen([redis_server_binary(), "--bind", host.ip, "--port", str(port), "--dir", str(base),
                          "--save", "", "--appendonly", "no", "--protected-mode", "no"],
                         env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, log_path=base / "redis.log", cwd=base)
    wait_port(host.ip, port, 15, process, "redis-server")
    return f"redis://{host.ip}:{port}/0"


def start_moto(host: Host, log_path: Path, env: dict[str, str], port: int = 5000) -> str:
    """moto's S3 server (`python -m moto.server`) on the host's address; its endpoint URL."""
    process = host.popen([sys.executable, "-m", "moto.server", "-H", host.ip, "-p", str(port)], env=env,
                         log_path=log_path)
    endpoint = f"http://{host.ip}:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            conn = http.client.HTTPConnection(host.ip, port, timeout=2)
            conn.request("GET", "/")
            conn.getresponse().read()
            conn.close()
            return endpoint
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto's S3 server did not answer on {endpoint}; log: {log_path}") from None
            time.sleep(0.2)


def temp_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
