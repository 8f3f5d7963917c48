"""Bearer-token verification (PyJWT): Clerk's RS256 via JWKS, a PEM key, or HS256 for development.

Algorithms are an explicit allow-list per key source, so a token cannot pick its own
verification: `alg: none` is never accepted and an HS256 token "signed" with the RSA
public key is refused because HS256 is only allowed with JWT_SECRET.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import falcon

import logconfig
import jwt

from models.base import storable_text
from settings import Settings

log = logging.getLogger("studiox.auth")

MAX_SUBJECT_CHARS = 255  # users.clerk_id
RSA_ALGORITHMS = ["RS256"]
HMAC_ALGORITHMS = ["HS256"]


@dataclass(frozen=True)
class Identity:
    clerk_id: str
    is_admin: bool
    claims: dict[str, Any]


def _unauthorized(message: str, code: str = "invalid_token") -> falcon.HTTPUnauthorized:
    return falcon.HTTPUnauthorized(title="Unauthorized", description=message, code=code,
                                   headers={"WWW-Authenticate": "Bearer"})


class KeysUnavailable(Exception):
    """The JWKS endpoint could not be read (down, or not a usable key set)."""


class JwksKeys:
    """The issuer's signing keys by `kid`, fetched from its JWKS URL and kept `lifespan` seconds.

    A token naming a `kid` we do not hold (the issuer rotated its keys) forces one refetch,
    and the fetched set replaces the old one, so a retired key stops being accepted. Forced
    refetches are at most one per `refetch_cooldown`: otherwise tokens with made-up kids
    would make every request wait on the issuer (the lock serializes fetches).
    """

    def __init__(self, url: str, *, lifespan: float = 300.0, refetch_cooldown: float = 30.0, timeout: float = 5.0):
        self._client = jwt.PyJWKClient(url, cache_jwk_set=False, timeout=timeout)
        self.lifespan, self.refetch_cooldown = lifespan, refetch_cooldown
        self._lock = threading.Lock()
        self._keys: dict[str, Any] = {}
        self._fetched_at: float | None = None
        self._forced_at: float | None = None

    def _fetch(self) -> None:
        try:
            keys = self._client.get_signing_keys()
        except jwt.PyJWTError as exc:
            raise KeysUnavailable(str(exc)) from None
        # Only RSA keys can verify RS256; a published EC/OKP key must not reach jwt.decode.
        self._keys = {key.key_id: key.key for key in keys if key.key_type == "RSA"}
        self._fetched_at = time.monotonic()

    def _refresh(self, now: float) -> None:
        try:
            self._fetch()
        except KeysUnavailable:
            if not self._keys:
                raise
            # Keep verifying with the keys we hold through an issuer outage; retry after the cooldown.
            log.warning("JWKS refresh failed; keeping the cached keys", exc_info=True)
            self._fetched_at = now - self.lifespan + self.refetch_cooldown

    def key_for(self, kid: str) -> Any | None:
        """The key for `kid`, or None when the issuer does not publish it. Raises
        KeysUnavailable only when no key set could ever be read."""
        with self._lock:
            now = time.monotonic()
            if self._fetched_at is None or now - self._fetched_at >= self.lifespan:
                self._refresh(now)
            elif kid not in self._keys and (self._forced_at is None or now - self._forced_at >= self.refetch_cooldown):
                self._forced_at = now
                self._refresh(now)
            return self._keys.get(kid)


class TokenVerifier:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._jwks = JwksKeys(settings.jwt_jwks_url) if settings.jwt_jwks_url else None
        self._admin_path, _, self._admin_value = settings.jwt_admin_claim.partition("=")

    def _key_and_algorithms(self, token: str, header: dict[str, Any]):
        alg = header.get("alg")
        if alg in RSA_ALGORITHMS and self._jwks is not None:
            kid = header.get("kid")
            if not isinstance(kid, str) or not kid:
                raise _unauthorized("Token names no signing key (kid)")
            try:
                key = self._jwks.key_for(kid)
            except KeysUnavailable as exc:
                # Not the caller's fault: a 401 would sign out every user while the issuer is down.
                log.error("cannot read the JWKS: %s", exc)
                raise falcon.HTTPServiceUnavailable(
                    title="Service Unavailable", description="Token keys are unavailable; try again shortly",
                    code="auth_unavailable",
                ) from None
            if key is None:
                raise _unauthorized(f"Signing key {kid!r} not found")
            return key, RSA_ALGORITHMS
        if alg in RSA_ALGORITHMS and self.settings.jwt_public_key:
            return self.settings.jwt_public_key, RSA_ALGORITHMS
        if alg in HMAC_ALGORITHMS and self.settings.jwt_secret:
            return self.settings.jwt_secret, HMAC_ALGORITHMS
        raise _unauthorized(f"Token algorithm {alg!r} is not accepted")

    def verify(self, token: str) -> Identity:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _unauthorized("Malformed token") from None
        key, algorithms = self._key_and_algorithms(token, header)
        options = {"require": ["exp", "sub"], "verify_aud": False}
        try:
            claims = jwt.decode(
                token, key, algorithms=algorithms, options=options,
                issuer=self.settings.jwt_issuer or None,
                leeway=self.settings.jwt_leeway_seconds,
            )
        except jwt.ExpiredSignatureError:
            raise _unauthorized("Token has expired", "token_expired") from None
        except (jwt.PyJWTError, TypeError, ValueError) as exc:  # key/alg mismatches surface as TypeError
            raise _unauthorized(f"Invalid token: {exc}") from None
        parties = self.settings.jwt_authorized_parties
        if parties and claims.get("azp") not in parties:
            raise _unauthorized("Token was issued for another party", "invalid_azp")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise _unauthorized("Token has no subject")
        # The subject is the users.clerk_id column: a value it cannot hold is no identity.
        if len(sub) > MAX_SUBJECT_CHARS or not storable_text(sub):
            raise _unauthorized("Token subject is not a valid user id")
        return Identity(clerk_id=sub, is_admin=self._is_admin(claims), claims=claims)

    def _is_admin(self, claims: dict[str, Any]) -> bool:
        value: Any = claims
        for part in self._admin_path.split("."):
            if not isinstance(value, dict) or part not in value:
                return False
            value = value[part]
        if self._admin_value:
            return value == self._admin_value or (isinstance(value, list) and self._admin_value in value)
        return value is True


class AuthMiddleware:
    """Resources declare `auth = None | "user" | "admin"` (default "user")."""

    def __init__(self, verifier: TokenVerifier):
        self.verifier = verifier

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource, params) -> None:
        required = getattr(resource, "auth", "user")
        if resource is None or required is None or req.method == "OPTIONS":
            return
        if not hasattr(resource, f"on_{req.method.lower()}"):
            return  # let Falcon answer 405: the method is wrong whoever asks
        header = req.get_header("Authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("Missing bearer token", "missing_token")
        identity = self.verifier.verify(token.strip())
        if required == "admin" and not identity.is_admin:
            raise falcon.HTTPForbidden(title="Forbidden", description="Operators only", code="admin_required")
        req.context.identity = identity
        logconfig.CLERK_ID.set(identity.clerk_id)
