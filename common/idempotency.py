"""``Idempotency-Key`` handling: a repeat within 5 minutes returns the first answer.

The key is scoped by tenant and endpoint. A repeat whose body differs from
the first is refused with 409 rather than silently answered with a result
for another request. Concurrent repeats wait for the first to finish.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from starlette.requests import Request

from common import jsoncodec
from common.auth import ApiPrincipal
from common.errors import ApiError

IDEMPOTENCY_TTL_SECONDS = 300
Result = tuple[int, dict[str, Any]]


class IdempotencyStore(Protocol):
    """Where first answers are kept; ``claim`` is atomic across the deployment."""

    async def claim(self, key: str, ttl: float) -> bool:
        """True if this caller is first for ``key`` (it must then ``save``)."""
        ...

    async def save(self, key: str, record: bytes, ttl: float) -> None: ...

    async def load(self, key: str) -> bytes | None: ...

    async def release(self, key: str) -> None: ...


class MemoryIdempotencyStore:
    """``IdempotencyStore`` for the embedded node."""

    def __init__(self) -> None:
        self.records: dict[str, tuple[float, bytes | None]] = {}

    def _prune(self, now: float) -> None:
        if len(self.records) > 10_000:
            for key in [k for k, (exp, _) in self.records.items() if exp <= now]:
                del self.records[key]

    async def claim(self, key: str, ttl: float) -> bool:
        now = time.monotonic()
        self._prune(now)
        current = self.records.get(key)
        if current is not None and current[0] > now:
            return False
        self.records[key] = (now + ttl, None)
        return True

    async def save(self, key: str, record: bytes, ttl: float) -> None:
        self.records[key] = (time.monotonic() + ttl, record)

    async def load(self, key: str) -> bytes | None:
        current = self.records.get(key)
        if current is None or current[0] <= time.monotonic():
            return None
        return current[1]

    async def release(self, key: str) -> None:
        self.records.pop(key, None)


class Idempotency:
    """Wraps a send so that a repeated ``Idempotency-Key`` sends nothing."""

    def __init__(self, store: IdempotencyStore, wait_seconds: float = 10.0) -> None:
        self.store = store
        self.wait_seconds = wait_seconds

    async def run(
        self,
        request: Request,
        tenant: str,
        who: ApiPrincipal,
        body: Any,
        produce: Callable[[], Awaitable[Result]],
    ) -> Result:
        key = request.headers.get("idempotency-key")
        if key is None:
            return await produce()
        if not 1 <= len(key) <= 255 or not key.isprintable():
            raise ApiError(
                422, "VALIDATION_ERROR", "Idempotency-Key must be 1-255 printable characters",
                {"field": "Idempotency-Key"},
            )
        scoped = f"{tenant}\x1f{request.url.path}\x1f{key}"
        fingerprint = hashlib.sha256(jsoncodec.dumps(body)).hexdigest()
        if await self.store.claim(scoped, IDEMPOTENCY_TTL_SECONDS):
            try:
                status, result = await produce()
            except BaseException:
                await self.store.release(scoped)
                raise
            record = jsoncodec.dumps({"fp": fingerprint, "status": status, "body": result})
            await self.store.save(scoped, record, IDEMPOTENCY_TTL_SECONDS)
            return status, result
        deadline = time.monotonic() + self.wait_seconds
        while True:
            stored = await self.store.load(scoped)
            if stored is not None:
                data = jsoncodec.loads(stored)
                if data["fp"] != fingerprint:
                    raise ApiError(
                        409, "IDEMPOTENCY_KEY_REUSED",
                        "Idempotency-Key was already used with a different request body",
                    )
                return int(data["status"]), data["body"]
            if time.monotonic() > deadline:
                raise ApiError(
                    409, "IDEMPOTENCY_IN_PROGRESS",
                    "a request with this Idempotency-Key is still being processed",
                )
            await asyncio.sleep(0.05)
