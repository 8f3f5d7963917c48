"""Bearer-token verification (PyJWT): Clerk's RS256 via JWKS, a PEM key, or HS256 for development.

Algorithms are an explicit allow-list per key source, so a token cannot pick its own
verification: `alg: none` is never accepted and an HS256 token "signed" with the RSA
public key is refused because HS256 is only allowed with JWT_SECRET.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import falcon
import jwt

from settings import Settings

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


class TokenVerifier:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._jwks = (
            # Keys are cached; an unknown `kid` (key rotation) triggers one refetch.
            jwt.PyJWKClient(settings.jwt_jwks_url, cache_keys=True, lifespan=3600, timeout=5)
            if settings.jwt_jwks_url else None
        )
        self._admin_path, _, self._admin_value = settings.jwt_admin_claim.partition("=")

    def _key_and_algorithms(self, token: str, header: dict[str, Any]):
        alg = header.get("alg")
        if alg in RSA_ALGORITHMS and self._jwks is not None:
            try:
                return self._jwks.get_signing_key_from_jwt(token).key, RSA_ALGORITHMS
            except jwt.PyJWKClientError as exc:
                raise _unauthorized(f"Signing key not found: {exc}") from None
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
        except jwt.PyJWTError as exc:
            raise _unauthorized(f"Invalid token: {exc}") from None
        parties = self.settings.jwt_authorized_parties
        if parties and claims.get("azp") not in parties:
            raise _unauthorized("Token was issued for another party", "invalid_azp")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise _unauthorized("Token has no subject")
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
        header = req.get_header("Authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("Missing bearer token", "missing_token")
        identity = self.verifier.verify(token.strip())
        if required == "admin" and not identity.is_admin:
            raise falcon.HTTPForbidden(title="Forbidden", description="Operators only", code="admin_required")
        req.context.identity = identity
