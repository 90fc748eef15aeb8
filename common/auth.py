"""Client JWT verification and backend API-key checks.

Only the one configured algorithm is ever accepted, so neither ``alg: none``
nor an RS256 public key replayed as an HS256 secret gets through.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field
from typing import Any

import jwt

from common.errors import ApiError
from common.protocol import valid_tenant, valid_user_id
from common.settings import Settings

DEFAULT_TENANT = "default"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a socket belongs to, taken from a verified token."""

    user_id: str
    tenant_id: str = DEFAULT_TENANT
    roles: tuple[str, ...] = ()
    expires_at: float = 0.0
    claims: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


class TokenVerifier:
    """Verifies client JWTs against the configured key and claims."""

    def __init__(self, settings: Settings) -> None:
        self.algorithm = settings.jwt_algorithm
        rs256 = self.algorithm == "RS256"
        self.key: Any = settings.public_key_pem() if rs256 else settings.effective_jwt_secret
        self.issuer = settings.jwt_issuer
        self.audience = settings.jwt_audience
        self.leeway = settings.jwt_leeway_seconds

    def verify_for_connection(self, token: str) -> Identity:
        """Like ``verify``, without the leeway on ``exp``: a socket never outlives it."""
        identity = self.verify(token)
        if identity.expires_at <= time.time():
            raise unauthorized("token expired")
        return identity

    def verify(self, token: str) -> Identity:
        try:
            claims = jwt.decode(
                token,
                self.key,
                algorithms=[self.algorithm],
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway,
                options={"require": ["sub", "exp"], "verify_aud": self.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise unauthorized("token expired") from None
        except jwt.ImmatureSignatureError:
            raise unauthorized("token not yet valid") from None
        except jwt.InvalidTokenError as exc:
            raise unauthorized(f"invalid token: {exc}") from None
        sub = claims.get("sub")
        if not valid_user_id(sub):
            raise unauthorized("invalid token: sub must be 1-256 printable characters")
        tenant = claims.get("tenant_id", DEFAULT_TENANT)
        # The same rule as X-Tenant-ID: a tenant id is part of Redis keys and rate-limit
        # keys, so separators (':', '{', '\x1f', ...) could make two tenants' keys collide.
        if not valid_tenant(tenant):
            raise unauthorized(
                "invalid token: tenant_id must be 1-64 of letters, digits, '-', '_', '.'"
            )
        roles = claims.get("roles") or []
        if not isinstance(roles, list):
            raise unauthorized("invalid token: roles must be a list")
        return Identity(
            user_id=str(sub),
            tenant_id=tenant,
            roles=tuple(str(r) for r in roles),
            expires_at=float(claims["exp"]),
            claims=claims,
        )


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "UNAUTHORIZED", message)


def mint_token(
    settings: Settings,
    sub: str,
    tenant: str | None = None,
    ttl: int = 3600,
    roles: list[str] | None = None,
    private_key: str | None = None,
) -> str:
    """Sign a client token (HS256 with JWT_SECRET, or RS256 with a private key)."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + ttl}
    if tenant:
        claims["tenant_id"] = tenant
    if roles:
        claims["roles"] = roles
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    if settings.jwt_algorithm == "RS256":
        if not private_key:
            raise ValueError("RS256 needs a private key to sign with")
        return jwt.encode(claims, private_key, algorithm="RS256")
    return jwt.encode(claims, settings.effective_jwt_secret, algorithm="HS256")


@dataclass(frozen=True, slots=True)
class ApiPrincipal:
    """A backend caller: ``tenant`` is set when its key is bound to one tenant."""

    bound_tenant: str | None


class ApiKeyChecker:
    """Constant-time comparison against the global key and tenant-bound keys."""

    def __init__(self, settings: Settings) -> None:
        self.global_key = settings.effective_api_key.encode()
        self.tenant_keys = [(k.encode(), t) for k, t in settings.tenant_keys.items()]

    def check(self, presented: str | None) -> ApiPrincipal:
        if not presented:
            raise unauthorized("missing X-API-Key header")
        candidate = presented.encode()
        matched: ApiPrincipal | None = None
        # Compare against every key so timing does not reveal which one matched.
        if hmac.compare_digest(candidate, self.global_key):
            matched = ApiPrincipal(bound_tenant=None)
        for key, tenant in self.tenant_keys:
            if hmac.compare_digest(candidate, key) and matched is None:
                matched = ApiPrincipal(bound_tenant=tenant)
        if matched is None:
            raise unauthorized("invalid API key")
        return matched
