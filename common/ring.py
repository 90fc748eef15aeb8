"""Partitioning: which partition an event belongs to, and which router owns it.

``partition_of`` is a stable hash (the same in every process and release)
of the tenant and the routing key, modulo the fixed partition count.
Partitions are placed on the live routers with a ketama consistent-hash
ring, so adding or removing one router moves only about 1/N of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from uhashring import HashRing

BROADCAST_KEY = "\x00broadcast"


def partition_of(tenant_id: str, key: str, partitions: int) -> int:
    digest = hashlib.blake2b(f"{tenant_id}\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % partitions


def partition_owners(routers: Iterable[str], partitions: int) -> dict[int, str]:
    """Each partition's owner among ``routers`` (empty when there are none)."""
    live = sorted(set(routers))
    if not live:
        return {}
    ring = HashRing(nodes=live, hash_fn="ketama")
    return {p: str(ring.get_node(f"partition-{p}")) for p in range(partitions)}
