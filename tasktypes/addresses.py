"""Which network addresses a task input URL may reach: judged the same at admission (for
literal addresses, without DNS) and at fetch time (for every resolved address)."""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Instance metadata services hand out cloud credentials; no configuration unlocks them.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean…
    "169.254.170.2",    # AWS ECS task metadata
    "169.254.170.23",   # AWS EKS pod identity
    "fd00:ec2::254",    # AWS IMDS over IPv6
    "fd00:ec2::23",     # AWS EKS pod identity over IPv6
    "100.100.100.200",  # Alibaba Cloud
    "168.63.129.16",    # Azure wire server (a public address)
    "192.0.0.192",      # Oracle Cloud
))
METADATA_HOSTS = frozenset({"metadata", "metadata.google.internal", "metadata.goog", "instance-data",
                            "instance-data.ec2.internal"})
NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries (and routes to) inside itself."""
    if ip.version != 6:
        return []
    found = [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if ip in NAT64 or int(ip) >> 32 == 0:  # NAT64 well-known prefix, and deprecated ::a.b.c.d
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def is_metadata_address(ip: IPAddress) -> bool:
    return any(a in METADATA_ADDRESSES for a in (ip, *_embedded_ipv4(ip)))


def is_public_address(ip: IPAddress) -> bool:
    """Globally routable unicast, and so is every IPv4 address it embeds. A NAT64 or
    IPv4-mapped address (reserved ranges themselves) is judged by the IPv4 it carries."""
    translated = ip.version == 6 and (ip in NAT64 or ip.ipv4_mapped is not None)
    for a in (_embedded_ipv4(ip) if translated else (ip, *_embedded_ipv4(ip))):
        if (not a.is_global or a.is_private or a.is_loopback or a.is_link_local or a.is_multicast
                or a.is_reserved or a.is_unspecified):
            return False
    return True


def literal_address(host: str) -> IPAddress | None:
    """The address a URL host names by itself (no DNS), in any form a resolver takes:
    dotted, IPv6, and the IPv4 shorthands (`2130706433`, `127.1`, `0x7f.1`)."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    import socket

    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


def url_refusal(url: str, *, allow_private: bool = False, allowed_hosts: tuple[str, ...] = ()) -> str | None:
    """Why this http(s) URL could never be fetched, judged without DNS; None when only a
    lookup can tell (names are checked again, resolved, when the worker fetches)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return "is not a valid URL"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials"
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        return "has no host"
    if host in METADATA_HOSTS:
        return "names a cloud metadata service"
    ip = literal_address(host)
    if ip is not None and is_metadata_address(ip):
        return "is a cloud metadata address"
    netloc = f"[{host}]" if ":" in host else host
    default_port = 443 if parts.scheme.lower() == "https" else 80
    entries = {entry.strip().lower() for entry in allowed_hosts}
    if allow_private or netloc in entries or f"{netloc}:{port or default_port}" in entries:
        return None
    if ip is not None and not is_public_address(ip):
        return "is a private, loopback or reserved address"
    if host == "localhost" or host.endswith(".localhost"):
        return "is a loopback address"
    return None
