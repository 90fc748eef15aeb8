"""Token buckets for in-process rate limits (client messages, embedded REST)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(slots=True)
class TokenBucket:
    """Refills ``rate`` tokens a second up to ``burst``; each take costs one."""

    rate: float
    burst: float
    tokens: float = -1.0
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.burst

    def take(self, now: float | None = None) -> float:
        """0.0 when allowed, else seconds until a token is available."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class RateLimiter(Protocol):
    """Keyed token buckets; ``take`` returns 0.0 when allowed, else the wait in seconds."""

    async def take(self, key: str, rate: float, burst: float) -> float: ...


class LocalLimiter:
    """``RateLimiter`` in process memory (embedded node), pruned when it grows."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self.buckets: dict[str, TokenBucket] = {}

    async def take(self, key: str, rate: float, burst: float) -> float:
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= self.max_keys:
                self._prune()
            bucket = self.buckets[key] = TokenBucket(rate, burst)
        return bucket.take()

    def _prune(self) -> None:
        now = time.monotonic()
        for key in [k for k, b in self.buckets.items() if now - b.stamp > b.burst / b.rate]:
            del self.buckets[key]
        if len(self.buckets) >= self.max_keys:
            self.buckets.clear()
