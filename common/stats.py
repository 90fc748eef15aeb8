"""Send counters per tenant (``/api/v1/stats``, ``/api/v1/tenants``).

Counting must not add a round trip to every send, so increments are
buffered in process; the cluster store flushes them to Redis every second
and reads add the part not yet flushed.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Protocol

FIELDS = ("sent", "delivered", "failed", "queued")


def _zeros() -> dict[str, int]:
    return dict.fromkeys(FIELDS, 0)


class StatsStore(Protocol):
    """Cluster-wide send counters."""

    def add(self, tenant_id: str, sent: int, delivered: int, failed: int, queued: int) -> None: ...

    async def totals(self, tenant_id: str) -> dict[str, int]: ...

    async def tenants(self) -> list[str]: ...


class MemoryStats:
    """``StatsStore`` of one process (the embedded node); also the cluster's buffer."""

    def __init__(self) -> None:
        self.counts: defaultdict[str, dict[str, int]] = defaultdict(_zeros)

    def add(self, tenant_id: str, sent: int, delivered: int, failed: int, queued: int) -> None:
        counts = self.counts[tenant_id]
        counts["sent"] += sent
        counts["delivered"] += delivered
        counts["failed"] += failed
        counts["queued"] += queued

    async def totals(self, tenant_id: str) -> dict[str, int]:
        return dict(self.counts.get(tenant_id) or dict.fromkeys(FIELDS, 0))

    async def tenants(self) -> list[str]:
        return sorted(self.counts)

    def take(self) -> dict[str, dict[str, int]]:
        taken = {t: c for t, c in self.counts.items() if any(c.values())}
        self.counts = defaultdict(_zeros)
        return taken
