"""The SSRF-guarded fetcher against a real loopback HTTP server.

No database needed: fetch_to_file only reads the fetch_* settings. Where a test needs a
name to resolve somewhere particular, DNS (outside our reach) is replaced by a fake
getaddrinfo; connections still go to the real loopback server.
"""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from settings import Settings
from tests.support.builders import image_bytes
from worker.fetch import fetch_to_file
from worker.processors.base import PermanentError, TransientError


PNG = image_bytes("PNG")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen_hosts: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", content_type: str = "text/plain", **headers) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        Handler.seen_hosts.append(self.headers.get("Host", ""))
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        try:
            self.route(url.path, query)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def route(self, path: str, query: dict[str, str]) -> None:
        if path == "/image.png":
            # A lying Content-Type: the fetcher must sniff the bytes.
            self._send(200, PNG, "text/plain")
        elif path == "/redirect":
            self._send(int(query.get("status", 302)), Location=query["to"])
        elif path == "/loop":
            self._send(302, Location="/loop")
        elif path == "/big":
            self.send_response(200)
            self.send_header("Content-Length", "5000000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            time.sleep(5)  # a fetcher that did not refuse early would hang here
        elif path == "/big-chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"400\r\n" + b"y" * 1024 + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/slow":
            time.sleep(4)
            self._send(200, PNG, "image/png")
        elif path == "/trickle":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                self.wfile.write(b"z")
                self.wfile.flush()
                time.sleep(0.2)
        elif path == "/short":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(PNG[:50])
            self.close_connection = True
        elif path == "/empty":
            self._send(200, b"")
        elif path.startswith("/status/"):
            self._send(int(path.rsplit("/", 1)[1]), b"nope")
        else:
            self._send(404, b"not found")


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass


@pytest.fixture(scope="module")
def server():
    httpd = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def base(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def port(server) -> int:
    return server.server_address[1]


def guarded(**changes) -> Settings:
    """The production defaults: nothing private allowed."""
    return Settings(environment="test", fetch_timeout_seconds=2, fetch_deadline_seconds=5,
                    fetch_max_bytes=64 * 1024).with_(**changes)


def allowing(port: int, **changes) -> Settings:
    return guarded(fetch_allowed_hosts=(f"127.0.0.1:{port}",), **changes)


@pytest.fixture
def target(tmp_path):
    return tmp_path / "input"


@pytest.fixture
def fake_dns(monkeypatch):
    """Names under .test resolve to what the test says; everything else resolves for real."""
    answers: dict[str, list[list[str]]] = {}
    calls: dict[str, int] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if isinstance(host, str) and host.endswith(".test"):
            calls[host] = calls.get(host, 0) + 1
            queue = answers.get(host) or []
            if not queue:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            addresses = queue.pop(0)
            return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                     (a, port) if ":" not in a else (a, port, 0, 0)) for a in addresses]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers, calls


class TestRefusedAddresses:
    @pytest.mark.parametrize("host", [
        "127.0.0.1", "localhost", "10.0.0.1", "10.255.1.2", "172.16.5.4", "192.168.1.1", "100.64.0.1",
        "169.254.169.254", "169.254.1.1", "0.0.0.0", "224.0.0.1", "240.0.0.1", "2130706433", "0x7f.1",
        "[::1]", "[::]", "[::ffff:127.0.0.1]", "[::ffff:169.254.169.254]", "[::ffff:10.0.0.1]",
        "[fe80::1]", "[fc00::1]", "[fd00:ec2::254]", "[2002:7f00:1::]", "[64:ff9b::a00:1]", "[ff02::1]",
    ])
    def test_private_and_reserved_addresses_are_refused(self, host, target):
        with pytest.raises(PermanentError) as err:
            fetch_to_file(f"http://{host}:9/x.png", target, guarded())
        assert err.value.code == "url_not_allowed"
        assert not target.exists()

    def test_loopback_server_is_refused_without_configuration(self, base, target):
        Handler.seen_hosts.clear()
        with pytest.raises(PermanentError) as err:
            fetch_to_file(f"{base}/image.png", target, guarded())
        assert err.value.code == "url_not_allowed"
        assert Handler.seen_hosts == []  # refused before connecting

    def test_a_name_resolving_to_loopback_is_refused(self, fake_dns, port, target):
        answers, _ = fake_dns
        answers["innocent.test"] = [["127.0.0.1"]]
        with pytest.raises(PermanentError) as err:
            fetch_to_file(f"http://innocent.test:{port}/image.png", target, guarded())
        assert err.value.code == "url_not_allowed"
        assert "127.0.0.1" not in err.value.message  # no resolver answers leak to the user

    def test_a_name_with_any_private_answer_is_refused(self, fake_dns, port, target):
        answers, _ = fake_dns
        answers["mixed.test"] = [["93.184.216.34", "10.0.0.5"]]
        with pytest.raises(PermanentError) as err:
            fetch_to_file(f"http://mixed.test:{port}/x", target, guarded())
        assert err.value.code == "url_not_allowed"

    @pytest.mark.parametrize("url", [
        "ftp://example.com/x.png", "file:///etc/passwd", "gopher://127.0.0.1:70/", "data:image/png;base64,AAAA",
        "javascript:alert(1)", "//example.com/x.png", "http:///x.png", "http://user:pw@example.com/x.png",
    ])
    def test_non_http_urls_are_refused(self, url, target):
        with pytest.raises(PermanentError) as err:
            fetch_to_file(url, target, guarded())
        assert err.value.code == "url_not_allowed"

    def test_metadata_addresses_stay_refused_when_private_is_allowed(self, target):
        for url in ("http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/",
                    "http://metadata.google.internal/computeMetadata/v1/"):
            with pytest.raises(PermanentError) as err:
                fetch_to_file(url, target, guarded(fetch_allow_private=True))
            assert err.value.code == "url_not_allowed"


class TestRedirects:
    def test_redirect_to_a_blocked_address_is_refused(self, base, port, target):
        for blocked in (f"http://localhost:{port}/image.png", "http://169.254.169.254/latest/meta-data/",
                        "http://10.0.0.1/", f"http://[::1]:{port}/image.png"):
            with pytest.raises(PermanentError) as err:
                fetch_to_file(f"{base}/redirect?to={blocked}", target, allowing(port))
            assert err.value.code == "url_not_allowed", blocked
            assert not target.exists()

    def test_the_allow_list_is_exact_about_ports(self, base, port, target):
        with pytest.raises(PermanentError) as err:
            fetch_to_file(f"{base}/redirect?to=http://127.0.0.1:{port + 1}/", target, allowing(port))
        assert err.value.code == "url_not_allowed"

    def test_redirects_within_allowed_hosts_are_followed(self, base, port, target):
        assert fetch_to_file(f"{base}/redirect?to=/redirect%3Fto%3D/image.png&status=301", target,
                             allowing(port)) == "image/png"
        assert target.read_bytes() == PNG

    def test_redirect_loops_stop_after_five_hops(self, base, port, target):
        Handler.seen_hosts.clear()
        with pytest.raises(PermanentError) as err:
            fetch_to_file(f"{base}/loop", target, allowing(port))
        assert err.value.code == "too_many_redirects"
        assert len(Handler.seen_hosts) == 6  # the first request and five redirects


class TestLimits:
    def test_declared_oversize_body_is_refused_before_reading(self, base, port, target):
        started = time.monotonic()
        with pytest.raises(PermanentError) as err:
            fetch_to_file(f"{base}/big", target, allowing(port, fetch_max_bytes=1000))
        assert err.value.code == "input_too_large"
        assert time.monotonic() - started < 2
        assert not target.exists()

    def test_undeclared_oversize_body_is_cut_off_while_streaming(self, base, port, target):
        with pytest.raises(PermanentError) as err:
            fetch_to_file(f"{base}/big-chunked", target, allowing(port, fetch_max_bytes=10_000))
        assert err.value.code == "input_too_large"
        assert not target.exists()

    def test_a_chunked_body_under_the_cap_is_fetched(self, base, port, target):
        fetch_to_file(f"{base}/big-chunked", target, allowing(port, fetch_max_bytes=200_000))
        assert target.stat().st_size == 100 * 1024

    def test_a_silent_server_hits_the_read_timeout(self, base, port, target):
        started = time.monotonic()
        with pytest.raises(TransientError) as err:
            fetch_to_file(f"{base}/slow", target, allowing(port, fetch_timeout_seconds=0.5))
        assert err.value.code == "fetch_failed"
        assert time.monotonic() - started < 2

    def test_a_trickling_server_hits_the_total_deadline(self, base, port, target):
        started = time.monotonic()
        with pytest.raises(TransientError) as err:
            fetch_to_file(f"{base}/trickle", target,
                          allowing(port, fetch_timeout_seconds=1, fetch_deadline_seconds=1.5))
        assert err.value.code == "fetch_failed"
        assert time.monotonic() - started < 3
        assert not target.exists()

    def test_a_body_cut_short_is_a_transient_failure(self, base, port, target):
        with pytest.raises(TransientError):
            fetch_to_file(f"{base}/short", target, allowing(port))


class TestStatuses:
    @pytest.mark.parametrize("status", [500, 502, 503, 429, 408])
    def test_server_errors_are_transient(self, base, port, target, status):
        with pytest.raises(TransientError) as err:
            fetch_to_file(f"{base}/status/{status}", target, allowing(port))
        assert err.value.code == "fetch_failed"
        assert str(status) in err.value.message

    @pytest.mark.parametrize("status", [400, 401, 403, 404, 410])
    def test_client_errors_are_permanent(self, base, port, target, status):
        with pytest.raises(PermanentError) as err:
            fetch_to_file(f"{base}/status/{status}", target, allowing(port))
        assert str(status) in err.value.message

    def test_an_empty_body_is_refused(self, base, port, target):
        with pytest.raises(PermanentError) as err:
            fetch_to_file(f"{base}/empty", target, allowing(port))
        assert err.value.code == "input_empty"

    def test_connection_refused_is_transient(self, port, target):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        with pytest.raises(TransientError):
            fetch_to_file(f"http://127.0.0.1:{free}/", target, guarded(fetch_allow_private=True))


class TestAllowedThroughConfiguration:
    def test_allowed_host_is_fetched_and_sniffed_by_content(self, base, port, target):
        assert fetch_to_file(f"{base}/image.png", target, allowing(port)) == "image/png"
        assert target.read_bytes() == PNG

    def test_allow_private_lets_loopback_through(self, base, target):
        assert fetch_to_file(f"{base}/image.png", target, guarded(fetch_allow_private=True)) == "image/png"

    def test_the_connection_is_pinned_to_the_checked_address(self, fake_dns, port, target):
        # A rebinding resolver answers loopback once, then nothing: a fetcher that looked
        # the name up again to connect would fail (or, in real life, reach another host).
        answers, calls = fake_dns
        answers["pinned.test"] = [["127.0.0.1"]]
        Handler.seen_hosts.clear()
        settings = guarded(fetch_allowed_hosts=(f"pinned.test:{port}",))
        assert fetch_to_file(f"http://pinned.test:{port}/image.png", target, settings) == "image/png"
        assert calls["pinned.test"] == 1
        assert Handler.seen_hosts == [f"pinned.test:{port}"]  # the Host header keeps the name


# --- end to end: a URL input fetched by a real worker --------------------------------

ISOLATED_REDIS_DB = 12  # a broker database no other test's worker consumes


@pytest.fixture(scope="module")
def url_worker(e2e_settings, server, tmp_path_factory):
    """The real image_analysis processor; only the loopback test server is allowed, by configuration."""
    from tests.support.env import isolated_broker, worker_env
    from tests.support.workers import CeleryWorker
    from worker.queue import create_celery

    allowed = f"127.0.0.1:{server.server_address[1]}"
    # The API admits the URL under the same allowance the worker fetches it with.
    settings = isolated_broker(e2e_settings, ISOLATED_REDIS_DB).with_(fetch_allowed_hosts=(allowed,))
    env = worker_env(settings, FETCH_ALLOWED_HOSTS=allowed)
    worker = CeleryWorker(env, queues=("image_analysis",), concurrency=1, name="fetch",
                          log_path=tmp_path_factory.mktemp("logs") / "fetch-worker.log")
    worker.start(create_celery(settings))
    yield settings
    worker.stop()


@pytest.fixture
def url_client(url_worker, e2e_engine, e2e_db, make_token):
    from falcon import testing

    from api.app import create_app
    from tests.support.http import sign_up
    from worker.queue import TaskQueue, create_celery

    client = testing.TestClient(create_app(url_worker, engine=e2e_engine, session_factory=e2e_db,
                                           queue=TaskQueue(create_celery(url_worker))))
    headers, _ = sign_up(client, make_token())
    return client, headers


def run_url_task(client, headers, url: str) -> dict:
    from tests.support.workers import wait_for

    r = client.simulate_post("/api/tasks/create", headers=headers, json={"type": "image_analysis", "input": url})
    assert r.status_code == 201, r.json
    task_id = r.json["task"]["id"]
    return wait_for(lambda: (t := client.simulate_get(f"/api/tasks/{task_id}", headers=headers).json["task"])
                    ["status"] in ("completed", "failed") and t, timeout=60, message="task final")


@pytest.mark.e2e
class TestUrlInputThroughAWorker:
    def test_an_allowed_url_is_fetched_and_processed(self, url_client, base):
        task = run_url_task(*url_client, f"{base}/image.png")
        assert task["status"] == "completed", task
        assert isinstance(task["output"], dict)

    def test_a_blocked_url_fails_the_task_and_refunds(self, url_client, base, port):
        client, headers = url_client
        task = run_url_task(client, headers, f"{base}/redirect?to=http://localhost:{port}/image.png")
        assert task["status"] == "failed", task
        assert task["errorCode"] == "url_not_allowed"
        assert client.simulate_get("/api/users/credits", headers=headers).json["credits"] == 20


def self_signed(tmp_path, name: str):
    """A certificate for `name`, its own CA: (cert path, key path)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def tls_server(tmp_path):
    """An https server on loopback whose certificate names `pinned.test`; records the SNI it saw."""
    import ssl

    cert, key = self_signed(tmp_path, "pinned.test")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    seen_sni: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: seen_sni.append(name)
    httpd = Server(("127.0.0.1", 0), Handler)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1], cert, seen_sni
    httpd.shutdown()
    httpd.server_close()


class TestHttpsPinning:
    def test_https_connects_to_the_pinned_address_with_the_names_sni_and_certificate(
            self, tls_server, fake_dns, monkeypatch, target):
        port, cert, seen_sni = tls_server
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trust the test CA
        answers, calls = fake_dns
        answers["pinned.test"] = [["127.0.0.1"]]
        settings = guarded(fetch_allowed_hosts=(f"pinned.test:{port}",))
        assert fetch_to_file(f"https://pinned.test:{port}/image.png", target, settings) == "image/png"
        assert seen_sni == ["pinned.test"] and calls["pinned.test"] == 1

    def test_a_certificate_for_another_name_is_refused(self, tls_server, fake_dns, monkeypatch, target):
        port, cert, _ = tls_server
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        answers, _ = fake_dns
        answers["other.test"] = [["127.0.0.1"]]
        settings = guarded(fetch_allowed_hosts=(f"other.test:{port}",))
        with pytest.raises(PermanentError) as err:
            fetch_to_file(f"https://other.test:{port}/image.png", target, settings)
        assert "certificate" in err.value.message
