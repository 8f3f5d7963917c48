"""Fetching http(s) task inputs without letting a URL reach inside our network (SSRF).

For every hop (the first URL and each redirect, at most MAX_REDIRECTS, followed by hand):

1. Only http and https; no credentials in the URL.
2. The host is resolved once with getaddrinfo and EVERY address is checked: private,
   loopback, link-local, multicast, reserved, unspecified, shared (CGNAT) and IPv4
   addresses hidden inside IPv6 (mapped, 6to4, Teredo, NAT64) are refused, and cloud
   metadata endpoints are refused always, whatever the configuration says.
3. The connection goes to an address that passed the check (pinned), never to a second
   DNS answer, so a rebinding resolver cannot swap in 127.0.0.1 after the check. For
   https the TLS handshake still uses the host name (SNI and certificate check).

The body is streamed to the target file under a size cap (a Content-Length over the cap
is refused before reading), every connect and read has a timeout, and a watchdog closes
the socket at the total deadline, which per-read timeouts cannot enforce against a server
that trickles a byte at a time.

Configuration lets chosen hosts through: FETCH_ALLOW_PRIVATE=1 allows every non-metadata
address (development on a LAN), FETCH_ALLOWED_HOSTS is an exact allow-list of `host` (any
port) or `host:port` entries (`[::1]:8080` for IPv6) whose addresses are not checked.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

from tasktypes.addresses import METADATA_HOSTS, is_metadata_address, is_public_address
from tasktypes.formats import sniff_content_type

from .processors.base import PermanentError, TransientError

MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
CHUNK = 1 << 16
USER_AGENT = "StudioX-Fetcher/1.0"


def _not_allowed(message: str) -> PermanentError:
    return PermanentError(message, code="url_not_allowed")


def _failed(message: str) -> TransientError:
    return TransientError(message, code="fetch_failed")


@dataclass(frozen=True)
class Target:
    url: str
    scheme: str
    host: str  # ASCII (IDNA) host name or IP literal, without brackets
    port: int
    path: str  # path and query, as sent on the request line

    @property
    def netloc(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host


def parse_target(url: str) -> Target:
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise _not_allowed(f"The URL is not valid: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _not_allowed("Only http and https URLs can be fetched")
    if parts.username is not None or parts.password is not None:
        raise _not_allowed("URLs with credentials are not accepted")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise _not_allowed("The URL has no host")
    try:
        host.encode("ascii")
    except UnicodeEncodeError:
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise _not_allowed("The URL's host name is not valid") from None
    # Keep what is already percent-encoded; encode spaces and non-ASCII characters.
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        path += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    default_port = 443 if scheme == "https" else 80
    return Target(url, scheme, host.lower(), port or default_port, path)


def host_allowed(target: Target, settings) -> bool:
    entries = {entry.strip().lower() for entry in settings.fetch_allowed_hosts}
    return target.netloc in entries or f"{target.netloc}:{target.port}" in entries


def resolve(host: str, port: int) -> list[str]:
    """Every address the name resolves to, in the resolver's order."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            raise PermanentError(f"The host {host} does not exist", code="fetch_failed") from None
        raise _failed(f"The host {host} could not be resolved right now") from None
    addresses: list[str] = []
    for *_, sockaddr in infos:
        address = str(sockaddr[0]).split("%", 1)[0]
        if address not in addresses:
            addresses.append(address)
    return addresses


def checked_addresses(target: Target, settings) -> list[str]:
    """The addresses we may connect to; refuses the URL if ANY resolved address is blocked
    (a name with one public and one private answer is not a public name)."""
    if target.host in METADATA_HOSTS:
        raise _not_allowed("The URL's host is a cloud metadata service")
    addresses = resolve(target.host, target.port)
    if not addresses:
        raise _failed(f"The host {target.host} has no addresses")
    unchecked = settings.fetch_allow_private or host_allowed(target, settings)
    for address in addresses:
        ip = ipaddress.ip_address(address)
        # Addresses stay out of the messages: they would tell a prober what our DNS knows.
        if is_metadata_address(ip):
            raise _not_allowed("The URL's host resolves to a cloud metadata address")
        if not unchecked and not is_public_address(ip):
            raise _not_allowed("The URL's host resolves to a private, loopback or reserved address")
    return addresses


class _Pinned:
    """Connects to the checked address; the Host header, SNI and certificate check keep the name."""

    def __init__(self, host: str, port: int, *, address: str, **kwargs):
        super().__init__(host, port, **kwargs)
        self._create_connection = (
            lambda _address, timeout, source_address=None:
            socket.create_connection((address, port), timeout, source_address)
        )


class PinnedHTTPConnection(_Pinned, http.client.HTTPConnection):
    pass


class PinnedHTTPSConnection(_Pinned, http.client.HTTPSConnection):
    pass


class _Watchdog:
    """Shuts the connection's socket down at the deadline, unblocking any read in progress."""

    def __init__(self, conn: http.client.HTTPConnection, seconds: float):
        self.fired = False
        self._conn = conn
        self._timer = threading.Timer(max(seconds, 0.0), self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        sock = self._conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()


def _connect(target: Target, addresses: list[str], timeout: float) -> http.client.HTTPConnection:
    last_error: Exception | None = None
    for address in addresses:
        if target.scheme == "https":
            conn = PinnedHTTPSConnection(target.host, target.port, address=address, timeout=timeout,
                                         context=ssl.create_default_context())
        else:
            conn = PinnedHTTPConnection(target.host, target.port, address=address, timeout=timeout)
        try:
            conn.connect()
            return conn
        except ssl.SSLCertVerificationError as exc:
            conn.close()
            raise PermanentError(f"The TLS certificate of {target.host} is not valid: {exc.verify_message}",
                                 code="fetch_failed") from None
        except OSError as exc:
            conn.close()
            last_error = exc
    raise _failed(f"Could not connect to {target.host}: {last_error}")


def _save_body(resp: http.client.HTTPResponse, target_path: Path, max_bytes: int) -> str:
    declared = resp.getheader("Content-Length")
    expected = int(declared) if declared and declared.strip().isdigit() else None
    if expected is not None and expected > max_bytes:
        raise PermanentError(f"The file is larger than the {max_bytes:,} byte limit", code="input_too_large")
    size, head = 0, b""
    with open(target_path, "wb") as out:
        while True:
            chunk = resp.read1(CHUNK)  # returns what arrived: the watchdog and timeouts stay in charge
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise PermanentError(f"The file is larger than the {max_bytes:,} byte limit", code="input_too_large")
            if len(head) < 64:
                head += chunk[:64 - len(head)]
            out.write(chunk)
    if expected is not None and size < expected:
        raise _failed("The connection closed before the whole file arrived")
    if size == 0:
        raise PermanentError("The URL returned an empty body", code="input_empty")
    return sniff_content_type(head)


def _get(target: Target, addresses: list[str], target_path: Path, settings, deadline: float) -> tuple[str, str]:
    """One hop: ("redirect", location) or ("file", sniffed content type)."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _failed("Fetching the URL took too long")
    conn = _connect(target, addresses, min(settings.fetch_timeout_seconds, remaining))
    watchdog = _Watchdog(conn, deadline - time.monotonic())
    try:
        with watchdog:
            conn.request("GET", target.path, headers={
                "User-Agent": USER_AGENT, "Accept": "image/*, video/*;q=0.8, */*;q=0.5",
                "Accept-Encoding": "identity", "Connection": "close",
            })
            resp = conn.getresponse()
            status = resp.status
            if status in REDIRECT_STATUSES:
                location = resp.getheader("Location")
                if not location:
                    raise PermanentError(f"The URL answered {status} without a Location", code="fetch_failed")
                return "redirect", location
            if status == 200:
                return "file", _save_body(resp, target_path, settings.fetch_max_bytes)
            reason = f"The URL answered {status} {resp.reason}".strip()
            if status in (408, 429) or status >= 500:
                raise _failed(reason)
            raise PermanentError(reason, code="fetch_failed")
    except (PermanentError, TransientError):
        raise
    except ssl.SSLCertVerificationError as exc:
        raise PermanentError(f"The TLS certificate of {target.host} is not valid: {exc.verify_message}",
                             code="fetch_failed") from None
    except (OSError, http.client.HTTPException) as exc:
        if watchdog.fired:
            raise _failed(f"Fetching the URL took longer than {settings.fetch_deadline_seconds:g}s") from None
        if isinstance(exc, TimeoutError):
            raise _failed(f"The server did not answer within {settings.fetch_timeout_seconds:g}s") from None
        raise _failed(f"Fetching the URL failed: {exc}") from None
    finally:
        conn.close()


def fetch_to_file(url: str, target: Path, settings) -> str:
    """Download `url` into `target` under the SSRF guard; returns the content type sniffed
    from the bytes. PermanentError for what can never work (blocked, too big, 4xx),
    TransientError for what may work later (network, timeouts, 5xx, 429)."""
    deadline = time.monotonic() + settings.fetch_deadline_seconds
    current = url
    try:
        for _hop in range(MAX_REDIRECTS + 1):
            hop = parse_target(current)
            kind, value = _get(hop, checked_addresses(hop, settings), target, settings, deadline)
            if kind == "file":
                return value
            current = urljoin(hop.url, value)
        raise PermanentError(f"The URL redirected more than {MAX_REDIRECTS} times", code="too_many_redirects")
    except BaseException:
        target.unlink(missing_ok=True)
        raise
