"""Rate limits: per client IP and per user by plan, counted in Redis, refused with 429
`rate_limited` and `Retry-After`; X-Forwarded-For believed only from configured proxies;
a Redis outage lets requests through (fail open) and is counted."""

from __future__ import annotations

from types import MappingProxyType

import pytest
from falcon import testing

from api.app import create_app
from devenv.embedded import free_port
from tests.support.env import isolated_broker, redis_db
from tests.support.http import sign_up

LIMITER_REDIS_DB = 8


@pytest.fixture
def limited(settings, engine, session_factory, task_queue, servers):
    def make(**limits) -> testing.TestClient:
        url = isolated_broker(settings, LIMITER_REDIS_DB).broker_url
        limits.setdefault("rate_limit_window_seconds", 3600)  # no window boundary inside a test
        configured = settings.with_(rate_limit_redis_url=limits.pop("redis_url", url),
                                    rate_limit_plans=MappingProxyType(limits.pop("plans", {})),
                                    rate_limit_ip=limits.pop("ip", 0), **limits)
        return testing.TestClient(create_app(configured, engine=engine, session_factory=session_factory,
                                             queue=task_queue))

    return make


def me(client, headers, ip="203.0.113.9", **extra):
    return client.simulate_get("/api/users/me", headers={**headers, **extra}, remote_addr=ip)


class TestPerUser:
    def test_past_the_plans_limit_a_429_rate_limited_with_retry_after(self, limited, make_token):
        client = limited(plans={"free": 2})
        headers, _ = sign_up(client, make_token())
        answers = [me(client, headers) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 429]
        refused = answers[-1]
        assert refused.json["code"] == "rate_limited" and refused.json["statusCode"] == 429
        assert 1 <= int(refused.headers["Retry-After"]) <= 3600

    def test_each_user_has_their_own_count(self, limited, make_token):
        client = limited(plans={"free": 1})
        first, _ = sign_up(client, make_token())
        second, _ = sign_up(client, make_token())
        assert me(client, first).status_code == 200
        assert me(client, first).status_code == 429
        assert me(client, second).status_code == 200

    def test_a_plan_without_a_limit_is_not_limited(self, limited, make_token):
        client = limited(plans={"pro": 1})
        headers, _ = sign_up(client, make_token())
        assert all(me(client, headers).status_code == 200 for _ in range(5))


class TestPerIp:
    def test_anonymous_requests_are_limited_by_address_and_health_is_exempt(self, limited):
        client = limited(ip=2)
        plans = [client.simulate_get("/api/billing/plans", remote_addr="198.51.100.7").status_code for _ in range(3)]
        assert plans == [200, 200, 429]
        assert client.simulate_get("/api/billing/plans", remote_addr="198.51.100.8").status_code == 200
        assert client.simulate_get("/health", remote_addr="198.51.100.7").status_code in (200, 503)

    def test_a_bad_token_or_an_unknown_path_counts_too(self, limited):
        client = limited(ip=2)
        bad = {"Authorization": "Bearer not-a-token"}
        answers = [client.simulate_get("/api/users/me", headers=bad, remote_addr="198.51.100.30").status_code,
                   client.simulate_get("/nope", remote_addr="198.51.100.30").status_code,
                   client.simulate_get("/api/users/me", headers=bad, remote_addr="198.51.100.30").status_code,
                   client.simulate_get("/api/users/me", headers=bad, remote_addr="198.51.100.30").status_code,
                   client.simulate_get("/api/billing/plans", remote_addr="198.51.100.30").status_code]
        # A bad token's request is counted after its 401; the one over the limit blocks the
        # address at once, whatever it asks next.
        assert answers == [401, 404, 401, 429, 429]

    def test_forwarded_for_is_believed_only_from_a_trusted_proxy(self, limited):
        client = limited(ip=1, trusted_proxies=("10.0.0.0/8",))
        hop = {"X-Forwarded-For": "192.0.2.1, 10.0.0.5"}
        # Through our proxy: the client's address counts, so two clients behind it are two.
        assert client.simulate_get("/api/billing/plans", remote_addr="10.0.0.2", headers=hop).status_code == 200
        assert client.simulate_get("/api/billing/plans", remote_addr="10.0.0.2",
                                   headers={"X-Forwarded-For": "192.0.2.2"}).status_code == 200
        assert client.simulate_get("/api/billing/plans", remote_addr="10.0.0.2", headers=hop).status_code == 429
        # From anywhere else the header is ignored: forging it does not buy a fresh count.
        direct = [client.simulate_get("/api/billing/plans", remote_addr="198.51.100.20",
                                      headers={"X-Forwarded-For": f"192.0.2.{i}"}).status_code for i in (10, 11)]
        assert direct == [200, 429]


class TestRedisOutage:
    def test_requests_pass_and_the_outage_is_counted(self, limited, make_token, servers):
        dead = redis_db(f"redis://127.0.0.1:{free_port()}", 0)
        client = limited(plans={"free": 1}, ip=1, redis_url=dead)
        headers, _ = sign_up(client, make_token())
        assert all(me(client, headers).status_code == 200 for _ in range(3))
        middleware = next(m for m in client.app._unprepared_middleware if type(m).__name__ == "RateLimitMiddleware")
        assert middleware.limiter.failed_open >= 4
