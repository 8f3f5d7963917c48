"""Bearer JWT verification: RS256 through a JWKS URL or a PEM key, HS256 for development.

The JWKS is served by a real HTTP server on loopback, so key fetching, caching and
rotation are exercised exactly as against Clerk.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from falcon import testing

from api.app import create_app
from tests.support.http import bearer

ERROR_KEYS = {"error", "statusCode", "code"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segment(obj: dict) -> str:
    return _b64(json.dumps(obj, separators=(",", ":")).encode())


def claims(sub: str | None = None, **extra) -> dict:
    now = int(time.time())
    return {"sub": sub or f"user_{uuid.uuid4().hex[:12]}", "iat": now, "nbf": now - 1, "exp": now + 300, **extra}


class RsaKey:
    """An RSA key pair as Clerk would hold it: private to sign, public as a JWK and a PEM."""

    def __init__(self, kid: str):
        self.kid = kid
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.public_pem = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    def jwk(self) -> dict:
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}

    def sign(self, payload: dict, kid: str | None = None) -> str:
        return jwt.encode(payload, self.private, algorithm="RS256", headers={"kid": kid or self.kid})


class JwksServer:
    """Serves `{"keys": [...]}` on 127.0.0.1 and counts the fetches."""

    def __init__(self, keys: list[RsaKey]):
        self.keys = keys
        self.requests = 0
        self.closed = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                body = json.dumps({"keys": [k.jwk() for k in server.keys]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        if not self.closed:
            self.closed = True
            self.httpd.shutdown()
            self.httpd.server_close()


@pytest.fixture(scope="module")
def key1() -> RsaKey:
    return RsaKey("key-1")


@pytest.fixture(scope="module")
def key2() -> RsaKey:
    return RsaKey("key-2")


@pytest.fixture
def jwks(key1):
    server = JwksServer([key1])
    yield server
    server.close()


@pytest.fixture
def make_client(settings, engine, session_factory, task_queue):
    """A TestClient over an app built from the test settings with `changes` applied."""

    def make(**changes) -> testing.TestClient:
        app = create_app(settings.with_(**changes), engine=engine, session_factory=session_factory, queue=task_queue)
        return testing.TestClient(app)

    return make


@pytest.fixture
def jwks_client(make_client, jwks):
    # No JWT_SECRET: as in production, only the issuer's keys verify tokens.
    return make_client(jwt_jwks_url=jwks.url, jwt_secret="")


def accepted(client: testing.TestClient, token: str) -> bool:
    """True when the token authenticates: initializing its user succeeds."""
    result = client.simulate_post("/api/users/initialize", headers=bearer(token))
    assert result.status_code in (200, 201, 401), (result.status_code, result.text)
    return result.status_code in (200, 201)


def assert_unauthorized(result, code: str | None = None) -> None:
    assert result.status_code == 401, result.text
    assert set(result.json) == ERROR_KEYS
    assert result.json["statusCode"] == 401
    assert isinstance(result.json["error"], str) and result.json["error"]
    if code:
        assert result.json["code"] == code
    assert result.headers.get("WWW-Authenticate", "").startswith("Bearer")


class TestJwksVerification:
    def test_valid_rs256_token_from_jwks_is_accepted(self, jwks_client, key1):
        sub = f"user_{uuid.uuid4().hex[:8]}"
        result = jwks_client.simulate_post("/api/users/initialize", headers=bearer(key1.sign(claims(sub))))
        assert result.status_code == 201, result.text
        assert result.json["user"]["clerkId"] == sub

    def test_keys_are_cached_between_requests(self, jwks_client, jwks, key1):
        for _ in range(3):
            assert accepted(jwks_client, key1.sign(claims()))
        assert jwks.requests == 1

    def test_new_kid_after_rotation_refetches_exactly_once_and_is_accepted(self, jwks_client, jwks, key1, key2):
        assert accepted(jwks_client, key1.sign(claims()))
        assert jwks.requests == 1
        jwks.keys = [key2]  # the issuer rotates: key-2 replaces key-1
        assert accepted(jwks_client, key2.sign(claims()))
        assert jwks.requests == 2
        assert accepted(jwks_client, key2.sign(claims()))
        assert jwks.requests == 2

    def test_rotation_retires_the_old_key(self, jwks_client, jwks, key1, key2):
        assert accepted(jwks_client, key1.sign(claims()))
        jwks.keys = [key2]
        assert accepted(jwks_client, key2.sign(claims()))
        assert_unauthorized(jwks_client.simulate_get("/api/users/me", headers=bearer(key1.sign(claims()))))

    def test_unknown_kids_cannot_make_every_request_refetch(self, jwks_client, jwks, key1):
        assert accepted(jwks_client, key1.sign(claims()))
        for n in range(10):
            token = key1.sign(claims(), kid=f"made-up-{n}")
            assert_unauthorized(jwks_client.simulate_get("/api/users/me", headers=bearer(token)))
        assert jwks.requests <= 2  # at most one forced refetch inside the cooldown

    def test_token_signed_by_a_key_outside_the_jwks_is_refused(self, jwks_client, key2):
        # Right kid, wrong key: the signature does not verify with the published key-1.
        assert_unauthorized(jwks_client.simulate_get("/api/users/me", headers=bearer(key2.sign(claims(), kid="key-1"))))

    def test_issuer_outage_after_first_fetch_keeps_cached_keys(self, jwks_client, jwks, key1, key2):
        assert accepted(jwks_client, key1.sign(claims()))
        jwks.close()  # the issuer's JWKS endpoint goes away
        assert accepted(jwks_client, key1.sign(claims()))
        # An unknown kid is still the token's problem (401), not an outage (503).
        assert_unauthorized(jwks_client.simulate_get("/api/users/me", headers=bearer(key2.sign(claims()))))

    def test_unreachable_jwks_is_503_not_401(self, make_client, key1):
        client = make_client(jwt_jwks_url="http://127.0.0.1:1/jwks.json", jwt_secret="")
        result = client.simulate_get("/api/users/me", headers=bearer(key1.sign(claims())))
        assert result.status_code == 503, result.text
        assert result.json == {"error": result.json["error"], "statusCode": 503, "code": "auth_unavailable"}


class EcKey:
    """An EC key published in the same JWKS (issuers may publish several key types)."""

    def __init__(self, kid: str):
        from cryptography.hazmat.primitives.asymmetric import ec

        self.kid = kid
        self.private = ec.generate_private_key(ec.SECP256R1())

    def jwk(self) -> dict:
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig", "alg": "ES256"}


class TestNonRsaKeysInTheJwks:
    def test_token_claiming_rs256_with_an_ec_kid_is_401_not_500(self, jwks_client, jwks, key1):
        jwks.keys = [key1, EcKey("ec-1")]
        forged = key1.sign(claims(), kid="ec-1")
        assert_unauthorized(jwks_client.simulate_get("/api/users/me", headers=bearer(forged)))
        assert accepted(jwks_client, key1.sign(claims()))


class TestPemPublicKey:
    def test_valid_rs256_token_verified_with_pem_key_is_accepted(self, make_client, key1):
        client = make_client(jwt_public_key=key1.public_pem, jwt_secret="")
        assert accepted(client, key1.sign(claims()))

    def test_token_from_another_key_is_refused(self, make_client, key1, key2):
        client = make_client(jwt_public_key=key1.public_pem, jwt_secret="")
        assert_unauthorized(client.simulate_get("/api/users/me", headers=bearer(key2.sign(claims()))))


class TestRefusedTokens:
    def test_alg_none_is_refused(self, jwks_client):
        token = f"{_segment({'alg': 'none', 'typ': 'JWT'})}.{_segment(claims())}."
        assert_unauthorized(jwks_client.simulate_get("/api/users/me", headers=bearer(token)))

    def test_alg_none_is_refused_even_with_a_dev_secret(self, client):
        token = f"{_segment({'alg': 'none', 'typ': 'JWT'})}.{_segment(claims())}."
        assert_unauthorized(client.simulate_get("/api/users/me", headers=bearer(token)))

    @pytest.mark.parametrize("source", ["jwks", "pem", "pem_and_dev_secret"])
    def test_hs256_signed_with_the_rsa_public_key_is_refused(self, make_client, jwks, key1, settings, source):
        # The classic key-confusion attack: the public key used as an HMAC secret.
        changes = {
            "jwks": {"jwt_jwks_url": jwks.url, "jwt_secret": ""},
            "pem": {"jwt_public_key": key1.public_pem, "jwt_secret": ""},
            "pem_and_dev_secret": {"jwt_public_key": key1.public_pem, "jwt_secret": settings.jwt_secret},
        }[source]
        client = make_client(**changes)
        signing_input = f"{_segment({'alg': 'HS256', 'typ': 'JWT', 'kid': key1.kid})}.{_segment(claims())}"
        signature = hmac.new(key1.public_pem.encode(), signing_input.encode(), hashlib.sha256).digest()
        token = f"{signing_input}.{_b64(signature)}"
        assert_unauthorized(client.simulate_get("/api/users/me", headers=bearer(token)))

    def test_expired_token_beyond_leeway_is_refused(self, jwks_client, settings, key1):
        now = int(time.time())
        token = key1.sign(claims(iat=now - 600, nbf=now - 600, exp=now - settings.jwt_leeway_seconds - 60))
        assert_unauthorized(jwks_client.simulate_get("/api/users/me", headers=bearer(token)), "token_expired")

    def test_token_expired_within_leeway_is_accepted(self, jwks_client, key1):
        now = int(time.time())
        assert accepted(jwks_client, key1.sign(claims(iat=now - 600, nbf=now - 600, exp=now - 5)))

    def test_token_without_exp_is_refused(self, jwks_client, key1):
        payload = claims()
        del payload["exp"]
        assert_unauthorized(jwks_client.simulate_get("/api/users/me", headers=bearer(key1.sign(payload))))

    def test_token_not_yet_valid_is_refused(self, jwks_client, settings, key1):
        token = key1.sign(claims(nbf=int(time.time()) + settings.jwt_leeway_seconds + 120))
        assert_unauthorized(jwks_client.simulate_get("/api/users/me", headers=bearer(token)))

    def test_wrong_issuer_is_refused_when_issuer_is_configured(self, make_client, jwks, key1):
        client = make_client(jwt_jwks_url=jwks.url, jwt_secret="", jwt_issuer="https://clerk.studiox.test")
        assert accepted(client, key1.sign(claims(iss="https://clerk.studiox.test")))
        assert_unauthorized(client.simulate_get("/api/users/me", headers=bearer(key1.sign(claims(iss="https://evil.test")))))
        assert_unauthorized(client.simulate_get("/api/users/me", headers=bearer(key1.sign(claims()))))

    def test_wrong_authorized_party_is_refused_when_configured(self, make_client, jwks, key1):
        client = make_client(jwt_jwks_url=jwks.url, jwt_secret="",
                             jwt_authorized_parties=("http://frontend.test", "https://app.studiox.test"))
        assert accepted(client, key1.sign(claims(azp="https://app.studiox.test")))
        result = client.simulate_get("/api/users/me", headers=bearer(key1.sign(claims(azp="https://evil.test"))))
        assert_unauthorized(result, "invalid_azp")

    def test_tampered_claims_are_refused(self, jwks_client, key1):
        header, _, signature = key1.sign(claims("user_alice")).split(".")
        forged = f"{header}.{_segment(claims('user_mallory'))}.{signature}"
        assert_unauthorized(jwks_client.simulate_get("/api/users/me", headers=bearer(forged)))

    def test_tampered_signature_is_refused(self, jwks_client, key1):
        header, payload, signature = key1.sign(claims()).split(".")
        raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
        raw[len(raw) // 2] ^= 0x01
        assert_unauthorized(jwks_client.simulate_get("/api/users/me", headers=bearer(f"{header}.{payload}.{_b64(bytes(raw))}")))

    def test_hs256_token_with_another_secret_is_refused(self, client):
        token = jwt.encode(claims(), "not-the-secret-" + "y" * 32, algorithm="HS256")
        assert_unauthorized(client.simulate_get("/api/users/me", headers=bearer(token)))

    def test_garbage_token_is_refused(self, client):
        assert_unauthorized(client.simulate_get("/api/users/me", headers=bearer("not.a.jwt")))

    def test_missing_authorization_header_is_refused(self, client):
        assert_unauthorized(client.simulate_get("/api/users/me"), "missing_token")

    @pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Token abc.def.ghi", "Bearer", "Bearer   "])
    def test_non_bearer_scheme_is_refused(self, client, make_token, header):
        if header.startswith("Token"):
            header = f"Token {make_token()}"  # a valid token under the wrong scheme
        assert_unauthorized(client.simulate_get("/api/users/me", headers={"Authorization": header}), "missing_token")


class TestDevelopmentTokens:
    def test_hs256_token_signed_with_jwt_secret_is_accepted(self, client, make_token):
        sub = f"user_{uuid.uuid4().hex[:8]}"
        result = client.simulate_post("/api/users/initialize", headers=bearer(make_token(sub)))
        assert result.status_code == 201
        assert result.json["user"]["clerkId"] == sub

    def test_scheme_is_case_insensitive(self, client, make_token):
        result = client.simulate_post("/api/users/initialize", headers={"Authorization": f"bearer {make_token()}"})
        assert result.status_code == 201

    def test_hs256_is_refused_when_only_rsa_keys_are_configured(self, jwks_client, make_token):
        assert_unauthorized(jwks_client.simulate_get("/api/users/me", headers=bearer(make_token())))


class TestUnknownUser:
    def test_valid_token_for_unknown_user_is_404_until_initialized(self, client, make_token):
        headers = bearer(make_token())
        result = client.simulate_get("/api/users/me", headers=headers)
        assert result.status_code == 404
        assert result.json["code"] == "user_not_found"
        assert set(result.json) == ERROR_KEYS
        assert client.simulate_post("/api/users/initialize", headers=headers).status_code == 201
        assert client.simulate_get("/api/users/me", headers=headers).status_code == 200


class TestAdminClaim:
    PATH = f"/api/tasks/{uuid.uuid4()}/status"
    BODY = {"status": "failed", "error": "stopped by operator"}

    def test_non_admin_is_forbidden(self, client, make_token):
        result = client.simulate_patch(self.PATH, headers=bearer(make_token(role="member")), json=self.BODY)
        assert result.status_code == 403
        assert result.json == {"error": result.json["error"], "statusCode": 403, "code": "admin_required"}

    def test_token_without_the_claim_is_forbidden(self, client, make_token):
        assert client.simulate_patch(self.PATH, headers=bearer(make_token()), json=self.BODY).status_code == 403

    def test_admin_claim_passes_auth(self, client, make_token):
        result = client.simulate_patch(self.PATH, headers=bearer(make_token(role="admin")), json=self.BODY)
        assert result.status_code == 404, result.text
        assert result.json["code"] == "task_not_found"

    def test_admin_claim_may_be_one_of_a_list_of_roles(self, client, make_token):
        result = client.simulate_patch(self.PATH, headers=bearer(make_token(role=["member", "admin"])), json=self.BODY)
        assert result.status_code == 404

    def test_dotted_claim_path_is_followed(self, make_client, make_token):
        client = make_client(jwt_admin_claim="metadata.role=admin")
        admin = client.simulate_patch(self.PATH, headers=bearer(make_token(metadata={"role": "admin"})), json=self.BODY)
        assert admin.status_code == 404
        top_level = client.simulate_patch(self.PATH, headers=bearer(make_token(role="admin")), json=self.BODY)
        assert top_level.status_code == 403
        other = client.simulate_patch(self.PATH, headers=bearer(make_token(metadata={"role": "member"})), json=self.BODY)
        assert other.status_code == 403

    def test_admin_route_without_token_is_401_not_403(self, client):
        assert_unauthorized(client.simulate_patch(self.PATH, json=self.BODY))
