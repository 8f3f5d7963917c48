"""More than one machine (issue 13): the service as separate hosts that share nothing but a
network, and a worker host whose cable is pulled in the middle of a task.

Three network namespaces on a private bridge (`tests/support/netns.py`):

    data  PostgreSQL, Redis and moto's S3 server, listening on the data host's address
    api   gunicorn (the real `gunicorn.conf.py`), port 8000
    work  a Celery worker on every queue and beat

and the test process on the bridge itself, which reaches the API host as a client would
(and the data host's PostgreSQL, as an operator would, to change a plan and audit the
money). The API and worker hosts each have their own MEDIA_ROOT and TMPDIR and keep their
files in the bucket (STORAGE_URL=s3://…, S3_ENDPOINT_URL on the data host), so nothing is
shared by accident: an output that reaches the client went API host → bucket → worker
host → bucket → API host.

`MULTIHOST_CUT_SECONDS` (default 8) sets how long the worker host's link stays down.
Skips where network namespaces cannot be made (not root, no `ip`, refused).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import jwt
import pytest
from PIL import Image
from sqlalchemy import func, select

from tests.support import netns
from tests.support.builders import image_bytes
from tests.support.env import worker_env
from tests.support.s3 import CREDENTIALS, SCRUBBED, S3Server
from tests.support.web import http_request

pytestmark = pytest.mark.e2e

JWT_SECRET = "multihost-secret-" + "m" * 32
API_PORT = 8000
BUCKET, PREFIX = "studiox-multihost", "media"
WORKER_NAME = f"multihost{os.getpid()}"
# The slow task: the stand-in processor sleeping SLOW_SECONDS in 20 steps (a progress
# write to PostgreSQL after each), on the worker host's image_analysis queue.
SLOW_SECONDS = 16
CUT_SECONDS = float(os.environ.get("MULTIHOST_CUT_SECONDS", "8"))
# Once the link is back, the task must be final within this.
FINAL_WITHIN = 120
# Recovery is bounded by these on every host (the reaper fails a task processing past its
# hard limit plus the margin once its lease is free; the sweep re-sends a lost message).
TIGHT = {
    "BEAT_SWEEP_SECONDS": "5",
    "BEAT_REAP_SECONDS": "5",
    "LOST_MESSAGE_AFTER_SECONDS": "15",
    "STUCK_MARGIN_SECONDS": "5",
    "TIME_LIMIT_IMAGE_ANALYSIS": "40,45",
}
FINAL = ("completed", "failed", "cancelled")


@dataclass
class Cluster:
    network: netns.Network
    data: netns.Host
    api: netns.Host
    work: netns.Host
    database_url: str
    redis_url: str
    s3_endpoint: str
    media_roots: dict[str, Path]
    logs: Path
    engine: object = None
    timeline: list[str] = field(default_factory=list)

    # -- as a client of the API host

    def request(self, method: str, path: str, *, headers: dict[str, str] | None = None, json_body=None,
                body: bytes | None = None, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
        headers = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        return http_request(self.api.ip, API_PORT, method, path, body=body, headers=headers, timeout=timeout)

    def call(self, method: str, path: str, expect: int, **kwargs) -> dict:
        status, _, payload = self.request(method, path, **kwargs)
        assert status == expect, (method, path, status, payload[:500])
        return json.loads(payload)

    def sign_up(self) -> tuple[dict[str, str], dict]:
        now = int(time.time())
        token = jwt.encode({"sub": f"user_{uuid.uuid4().hex[:12]}", "iat": now, "nbf": now - 1, "exp": now + 3600},
                           JWT_SECRET, algorithm="HS256")
        headers = {"Authorization": f"Bearer {token}"}
        return headers, self.call("POST", "/api/users/initialize", 201, headers=headers)["user"]

    def upload(self, headers: dict[str, str], data: bytes) -> str:
        return self.call("POST", "/api/uploads", 201, headers={**headers, "Content-Type": "image/png"},
                         body=data)["upload"]["id"]

    def task(self, headers: dict[str, str], task_id: str) -> dict:
        return self.call("GET", f"/api/tasks/{task_id}", 200, headers=headers)["task"]

    # -- as an operator, on the data host's PostgreSQL

    def sessions(self):
        from models.db import make_session_factory

        return make_session_factory(self.engine)()

    def s3(self):
        return S3Server(self.s3_endpoint).client()

    def note(self, line: str) -> None:
        self.timeline.append(line)
        print(line, flush=True)

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for path in sorted(self.logs.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)


def _host_env(cluster_urls: dict[str, str], media_root: Path, tmp: Path, **extra: str) -> dict[str, str]:
    """A host's environment: the data host's servers by address, its own disk, and nothing
    of the test machine's (no proxies, no AWS configuration, no suite server URLs)."""
    from settings import Settings

    settings = Settings(environment="test", database_url=cluster_urls["database"], broker_url=cluster_urls["redis"],
                        jwt_secret=JWT_SECRET, media_root=media_root)
    env = worker_env(settings, **CREDENTIALS, STORAGE_URL=f"s3://{BUCKET}/{PREFIX}",
                     S3_ENDPOINT_URL=cluster_urls["s3"], TMPDIR=str(tmp), **TIGHT, **extra)
    for name in [*SCRUBBED, "TEST_DATABASE_URL", "TEST_REDIS_URL", "STUDIOX_VAR_DIR"]:
        env.pop(name, None)
    for name in list(env):
        if name.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
            del env[name]
    return env


def _wait_for_worker(cluster_urls: dict[str, str], process, timeout: float = 60) -> None:
    from settings import Settings
    from worker.queue import create_celery

    celery = create_celery(Settings(environment="test", broker_url=cluster_urls["redis"]))
    destination = [f"{WORKER_NAME}@{socket.gethostname()}"]
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the worker exited with {process.returncode}")
            if celery.control.ping(destination=destination, timeout=0.5):
                return
        raise TimeoutError("the worker host's worker did not answer a ping")
    finally:
        celery.close()


def _wait_for_api(ip: str, process, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if http_request(ip, API_PORT, "GET", "/health", timeout=3)[0] == 200:
                return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the API host's gunicorn did not answer /health")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = netns.unavailable()
    if reason:
        pytest.skip(f"cannot make network namespaces here: {reason}")
    from devenv.embedded import migrate
    from models.db import create_engine

    logs = tmp_path_factory.mktemp("multihost-logs")
    # Each host's own disk: its MEDIA_ROOT (which must stay empty) and TMPDIR.
    media_roots = {role: netns.temp_dir(f"studiox-multihost-{role}-media-") for role in ("api", "work")}
    tmps = {role: netns.temp_dir(f"studiox-multihost-{role}-tmp-") for role in ("data", "api", "work")}
    network = netns.Network.create()
    engine = None
    try:
        data, api, work = (network.add_host(role) for role in ("data", "api", "work"))
        try:
            database_url = netns.start_postgres(data)
        except (FileNotFoundError, KeyError) as exc:  # no server binaries, or no postgres user
            pytest.skip(f"cannot run PostgreSQL on the data host: {exc}")
        migrate(database_url)
        redis_url = netns.start_redis(data, tmps["data"] / "redis")
        moto_env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        s3_endpoint = netns.start_moto(data, logs / "data-s3.log", {**moto_env, **CREDENTIALS})
        urls = {"database": database_url, "redis": redis_url, "s3": s3_endpoint}

        cluster = Cluster(network, data, api, work, database_url, redis_url, s3_endpoint, media_roots, logs)
        cluster.engine = engine = create_engine(database_url, pool_size=2, max_overflow=2)
        cluster.s3().create_bucket(Bucket=BUCKET)

        # The worker host: every queue (the stand-in processor behind image_analysis, the
        # real one behind advanced_editing) and beat.
        work_env = _host_env(urls, media_roots["work"], tmps["work"],
                             PROCESSOR_OVERRIDES="image_analysis=tests.support.processors:sleepy")
        worker = work.popen([sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q",
                             "image_analysis,advanced_editing,video_generation,maintenance", "-c", "2",
                             "-n", f"{WORKER_NAME}@%h", "--without-mingle", "--without-gossip", "-l", "info"],
                            env=work_env, log_path=logs / "work-worker.log")
        work.popen([sys.executable, "-m", "celery", "-A", "worker.app", "beat", "-s", str(tmps["work"] / "beat"),
                    "--pidfile=", "-l", "info"], env=work_env, log_path=logs / "work-beat.log")
        web = api.popen([sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", "api.app:wsgi()",
                         "-b", f"{api.ip}:{API_PORT}", "-w", "1", "--graceful-timeout", "2", "--no-control-socket"],
                        env=_host_env(urls, media_roots["api"], tmps["api"]), log_path=logs / "api-gunicorn.log")
        _wait_for_api(api.ip, web)
        _wait_for_worker(urls, worker)
        yield cluster
    finally:
        if engine is not None:
            engine.dispose()
        network.close()
        for path in [*media_roots.values(), *tmps.values()]:
            shutil.rmtree(path, ignore_errors=True)
        left = network.leftovers()
        assert not left, f"namespaces or links left behind: {left}"


def _wait_final(cluster: Cluster, headers: dict[str, str], task_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        task = cluster.task(headers, task_id)
        if task["status"] in FINAL or time.monotonic() > deadline:
            return task
        time.sleep(0.25)


def _money(cluster: Cluster, user_id: str, task_id: str) -> tuple[int, int, list[int], list[int]]:
    """(the user's credits, their ledger sum, the task's charges, its refunds), after
    checking that the audit finds nothing anywhere."""
    from models import Transaction
    from models.audit import run_checks
    from models.users import User

    with cluster.sessions() as s:
        violations = list(run_checks(s))
        assert violations == [], violations
        credits = s.get(User, uuid.UUID(user_id)).credits
        ledger = s.scalar(select(func.coalesce(func.sum(Transaction.amount), 0))
                          .where(Transaction.user_id == uuid.UUID(user_id)))
        rows = s.execute(select(Transaction.type, Transaction.amount)
                         .where(Transaction.task_id == uuid.UUID(task_id))).all()
    charges = [amount for kind, amount in rows if kind == "credit_deduction"]
    refunds = [amount for kind, amount in rows if kind == "credit_refund"]
    return credits, ledger, charges, refunds


def test_a_task_goes_from_the_api_host_through_the_worker_host_and_back(cluster):
    from models.billing import change_plan
    from models.db import make_session_factory, session_scope

    headers, user = cluster.sign_up()
    # An operator moves the user to pro, on the data host's database (as `studiox plans set`).
    with session_scope(make_session_factory(cluster.engine)) as s:
        assert change_plan(s, uuid.UUID(user["id"]), "pro", reason="operator").plan_id == "pro"
    me = cluster.call("GET", "/api/users/me", 200, headers=headers)
    assert me["user"]["planId"] == "pro"

    upload_id = cluster.upload(headers, image_bytes("PNG", (320, 240), (30, 160, 200)))
    created = cluster.call("POST", "/api/tasks/create", 201, headers=headers, json_body={
        "type": "advanced_editing", "input": upload_id,
        "params": {"operations": [{"op": "resize", "width": 160}, {"op": "grayscale"}], "format": "png"}})
    task_id = created["task"]["id"]
    task = _wait_final(cluster, headers, task_id, 60)
    assert task["status"] == "completed", (task, cluster.log_tail())

    status, response_headers, content = cluster.request("GET", task["outputUrl"], headers=headers)
    assert status == 200 and response_headers["content-type"] == "image/png"
    assert len(content) == task["outputSize"]
    image = Image.open(io.BytesIO(content))
    image.verify()
    image = Image.open(io.BytesIO(content))
    assert image.size == (160, 120) and image.mode in ("L", "LA")

    # Both files went through the bucket on the data host, none through either host's disk.
    keys = {item["Key"] for item in cluster.s3().list_objects_v2(Bucket=BUCKET).get("Contents", ())}
    assert {f"{PREFIX}/uploads/{user['id']}/{upload_id}", f"{PREFIX}/{task['output']['file']['key']}"} <= keys
    for role, root in cluster.media_roots.items():
        assert list(root.rglob("*")) == [], role

    credits, ledger, charges, refunds = _money(cluster, user["id"], task_id)
    assert credits == ledger and charges == [-2] and refunds == []


def test_the_worker_hosts_link_cut_mid_task_still_ends_final_and_charged_once(cluster):
    headers, user = cluster.sign_up()
    upload_id = cluster.upload(headers, image_bytes("PNG", (64, 48)))
    began = time.monotonic()

    def at() -> str:
        return f"{time.monotonic() - began:6.1f}s"

    task_id = cluster.call("POST", "/api/tasks/create", 201, headers=headers, json_body={
        "type": "image_analysis", "input": upload_id, "params": {"sleep": SLOW_SECONDS}})["task"]["id"]
    cluster.note(f"{at()} submitted {task_id} (sleeps {SLOW_SECONDS} s in 20 steps)")

    # Mid-task: charged, processing, a few steps done.
    deadline = time.monotonic() + 30
    while True:
        task = cluster.task(headers, task_id)
        if task["status"] == "processing" and task["progress"] >= 15:
            break
        assert task["status"] in ("pending", "processing") and time.monotonic() < deadline, (task, cluster.log_tail())
        time.sleep(0.1)
    cluster.note(f"{at()} processing at {task['progress']}%: cutting the worker host's link for {CUT_SECONDS:g} s")

    cluster.work.cut()
    try:
        cut_until = time.monotonic() + CUT_SECONDS
        seen = set()
        while time.monotonic() < cut_until:
            # The API host still answers; the task does not move while its runner is cut off.
            task = cluster.task(headers, task_id)
            if (task["status"], task["progress"]) not in seen:
                seen.add((task["status"], task["progress"]))
                cluster.note(f"{at()}   (cut) {task['status']} {task['progress']}%")
            time.sleep(0.5)
        sockets = cluster.work.run(["ss", "-tnoi", "state", "established"], check=False).stdout
    finally:
        cluster.work.restore()
    cluster.note(f"{at()} link restored")
    restored = time.monotonic()

    last = None
    while time.monotonic() - restored < FINAL_WITHIN:
        task = cluster.task(headers, task_id)
        if (task["status"], task["progress"]) != last:
            last = (task["status"], task["progress"])
            cluster.note(f"{at()}   {task['status']} {task['progress']}%"
                         + (f" ({task['error']})" if task.get("error") else ""))
        if task["status"] in FINAL:
            break
        time.sleep(0.25)
    else:
        stuck = cluster.work.run(["ss", "-tnoi", "state", "established"], check=False).stdout
        pytest.fail(f"the task is still {task['status']} {FINAL_WITHIN} s after the link came back\n"
                    "timeline:\n" + "\n".join(cluster.timeline) +
                    f"\nworker host's connections during the cut:\n{sockets}\nand now:\n{stuck}\n"
                    + cluster.log_tail(60))
    cluster.note(f"{at()} final: {task['status']}, {time.monotonic() - restored:.1f} s after the link came back")

    credits, ledger, charges, refunds = _money(cluster, user["id"], task_id)
    assert credits == ledger, (credits, ledger)
    assert len(charges) <= 1, charges
    if task["status"] == "completed":
        assert (charges, refunds) == ([-1], []), (charges, refunds)
    else:
        assert refunds == [-c for c in charges], (task, charges, refunds)
    # The user's balance as the API shows it agrees with the ledger.
    assert cluster.call("GET", "/api/users/me", 200, headers=headers)["user"]["credits"] == ledger
