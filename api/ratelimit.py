"""Request rate limits: per client IP on every request, and per user by plan, counted in
Redis in fixed windows (one INCR per check). A refusal is 429 `rate_limited` with
`Retry-After`. If Redis cannot be reached the request goes through (fail open): a broken
limiter must not take the API down; each such pass is counted (`failed_open`) and logged.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections.abc import Mapping, Sequence

import falcon
import redis

import metrics

from models.errors import DomainError

log = logging.getLogger(__name__)


class RateLimited(DomainError):
    """Too many requests; retry after the time in Retry-After."""

    status_code = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


def parse_networks(values: Sequence[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(value, strict=False) for value in values)


def client_ip(req: falcon.Request, trusted: Sequence) -> str:
    """The caller's address: the peer's, or, when the peer is a trusted proxy, the nearest
    address in X-Forwarded-For that is not one of ours (what a client cannot forge)."""
    peer = req.remote_addr or ""
    if not trusted or not _within(peer, trusted):
        return peer
    hops = [hop.strip() for hop in (req.get_header("X-Forwarded-For") or "").split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _within(hop, trusted):
            return hop if _address(hop) is not None else peer
    return hops[0] if hops and _address(hops[0]) is not None else peer


def _address(value: str):
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def _within(value: str, networks: Sequence) -> bool:
    address = _address(value)
    return address is not None and any(address in network for network in networks)


class RateLimiter:
    def __init__(self, redis_url: str, *, per_plan: Mapping[str, int], per_ip: int, window: int,
                 trusted_proxies: Sequence[str] = ()):
        self.redis = (redis.Redis.from_url(redis_url, socket_timeout=0.25, socket_connect_timeout=0.25)
                      if redis_url else None)
        self.per_plan, self.per_ip, self.window = dict(per_plan), per_ip, window
        self.trusted = parse_networks(trusted_proxies)
        self.failed_open = 0
        self._last_warning = 0.0

    def hit(self, *checks: tuple[str, str, int]) -> None:
        """Count one request against each (scope, key, limit) per window, in one round trip;
        raise RateLimited past any limit."""
        checks = tuple(check for check in checks if check[2] > 0)
        if self.redis is None or not checks:
            return
        now = time.time()
        window_start = int(now // self.window) * self.window
        try:
            pipe = self.redis.pipeline(transaction=False)
            for scope, key, _ in checks:
                name = f"studiox:ratelimit:{scope}:{key}:{window_start}"
                pipe.incr(name)
                pipe.expire(name, self.window + 1)
            counts = pipe.execute()[::2]
        except redis.RedisError as exc:
            self.failed_open += 1
            metrics.RATE_LIMIT_FAILED_OPEN.inc()
            if now - self._last_warning > 10:
                self._last_warning = now
                log.warning("rate limits not enforced: Redis unreachable (%s); %d requests passed unchecked",
                            exc, self.failed_open)
            return
        for (scope, _, limit), count in zip(checks, counts):
            if count > limit:
                retry_after = max(1, math.ceil(window_start + self.window - now))
                raise RateLimited(f"Too many requests: {limit} per {self.window} s for this {scope}; retry in "
                                  f"{retry_after} s", retry_after)

    def limit_user(self, req: falcon.Request, clerk_id: str, plan_id: str) -> None:
        """The user's limit by plan, and the IP's when it was left to count with it."""
        checks = [("user", clerk_id, self.per_plan.get(plan_id, 0))]
        ip = req.context.get("rate_ip")
        if ip is not None:
            req.context.rate_ip = None
            checks.insert(0, ("ip", ip, self.per_ip))
        self.hit(*checks)


class RateLimitMiddleware:
    """The per-IP limit on every request but the paths in `exempt` (/health, Stripe's
    webhook, /metrics); the per-user limit by plan where the user is loaded
    (`api.context.current_user`).

    A request with a bearer token has its IP counted together with its user, in one round
    trip. If it never gets that far (a bad token, an unknown path), its IP is counted after
    the answer, and an address found over its limit is refused by this process at once
    until its window ends: a flood of bad tokens is limited too.
    """

    def __init__(self, limiter: RateLimiter, exempt: Sequence[str] = ()):
        self.limiter, self.exempt = limiter, frozenset(exempt)
        self._blocked: dict[str, float] = {}  # ip -> end of the window it is over its limit in

    def process_request(self, req: falcon.Request, resp) -> None:
        req.context.rate_limiter = self.limiter
        if req.method == "OPTIONS" or req.path in self.exempt or self.limiter.per_ip <= 0:
            return
        ip = client_ip(req, self.limiter.trusted)
        until = self._blocked.get(ip)
        if until is not None:
            if until > time.time():
                raise RateLimited(f"Too many requests from this address; retry in {math.ceil(until - time.time())} s",
                                  max(1, math.ceil(until - time.time())))
            del self._blocked[ip]
        if (req.get_header("Authorization") or "").lower().startswith("bearer "):
            req.context.rate_ip = ip  # counted with the user, or after the answer
        else:
            self.limiter.hit(("ip", ip, self.limiter.per_ip))

    def process_response(self, req, resp, resource, req_succeeded) -> None:
        ip = req.context.get("rate_ip")
        if ip is None:
            return
        req.context.rate_ip = None
        try:
            self.limiter.hit(("ip", ip, self.limiter.per_ip))
        except RateLimited as refused:
            if len(self._blocked) > 10_000:
                now = time.time()
                self._blocked = {k: v for k, v in self._blocked.items() if v > now}
            self._blocked[ip] = time.time() + refused.retry_after
