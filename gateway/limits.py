"""Rate limits at the edge: REST requests and socket connects (PROTOCOL §7).

The bucket store is a ``RateLimiter``: in process for the embedded node,
in Redis for a cluster so a client cannot multiply its allowance by
spreading over gateways.
"""

from __future__ import annotations

import hashlib
import math

from starlette.requests import HTTPConnection

from common.auth import ApiKeyChecker, Identity
from common.errors import ApiError
from common.metrics import Metrics
from common.ratelimit import RateLimiter
from common.settings import Settings
from gateway.http import header


def rate_limited(retry_after: float, message: str) -> ApiError:
    seconds = max(1, math.ceil(retry_after))
    return ApiError(
        429,
        "RATE_LIMITED",
        message,
        {"retry_after_seconds": seconds},
        headers={"Retry-After": str(seconds)},
    )


class ConnectLimiter:
    """``RATELIMIT_WS_CONNECTIONS_PER_MINUTE`` per user, for WebSocket and SSE."""

    def __init__(self, settings: Settings, limiter: RateLimiter, metrics: Metrics) -> None:
        self.enabled = settings.ratelimit_enabled
        self.per_minute = settings.ratelimit_ws_connections_per_minute
        self.limiter = limiter
        self.metrics = metrics

    async def check(self, conn: HTTPConnection, identity: Identity) -> None:
        if not self.enabled:
            return
        key = f"conn\x1f{identity.tenant_id}\x1f{identity.user_id}"
        wait = await self.limiter.take(key, self.per_minute / 60.0, float(self.per_minute))
        if wait > 0:
            self.metrics.ratelimited.labels("connect").inc()
            raise rate_limited(wait, "too many connection attempts")


class HttpLimiter:
    """Per API key (or client address) token bucket with ``X-RateLimit-*`` headers.

    Only a valid key gets a bucket of its own: a request with a missing or wrong key
    counts against its client address, so guessing keys does not get a fresh burst
    per guess. Buckets are named by a digest of the key, never the key itself, so
    API keys do not appear in Redis key names.
    """

    def __init__(self, settings: Settings, limiter: RateLimiter, metrics: Metrics) -> None:
        self.enabled = settings.ratelimit_enabled
        self.rate = settings.ratelimit_http_requests_per_second
        self.burst = float(settings.ratelimit_http_burst_size)
        self.limiter = limiter
        self.metrics = metrics
        self.keys = ApiKeyChecker(settings)

    def bucket(self, conn: HTTPConnection) -> str:
        presented = header(conn, b"x-api-key")
        if presented:
            try:
                self.keys.check(presented)
            except ApiError:
                pass
            else:
                digest = hashlib.sha256(presented.encode()).hexdigest()[:32]
                return f"http\x1fkey\x1f{digest}"
        return f"http\x1faddr\x1f{conn.client.host if conn.client else 'unknown'}"

    async def check(self, conn: HTTPConnection) -> dict[str, str]:
        if not self.enabled:
            return {}
        wait = await self.limiter.take(self.bucket(conn), self.rate, self.burst)
        headers = {"X-RateLimit-Limit": str(int(self.burst))}
        if wait > 0:
            self.metrics.ratelimited.labels("http").inc()
            err = rate_limited(wait, "too many requests")
            err.headers.update(headers)
            err.headers["X-RateLimit-Remaining"] = "0"
            raise err
        return headers
