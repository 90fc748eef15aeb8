"""Partition ownership when Redis fails or a reader dies: no stranded, no shared partitions.

Found by the Redis-restart fault scenario: a router whose lease keys vanished with
an emptied Redis kept reading its partitions on its local deadlines while another
router had already taken them, and entries read by a router that then let the
partition go sat in its pending list with nobody to route them.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
from cluster_harness import RedisServer, router_in_process, wait_for_partitions

import router.cluster as router_cluster
from common.backends.redis_client import RedisHandle
from common.backends.redis_streams import GROUP, PartitionProducer, encode_accepted
from common.protocol import Notification, Target
from router.leases import Leases

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(60)]


async def test_held_partitions_drop_out_as_their_own_deadlines_pass(
    redis_server: RedisServer,
) -> None:
    handle = RedisHandle(redis_server.url, "leaseexpiry")
    try:
        leases = Leases(handle, "r1", ttl_seconds=0.5)  # trusted for 0.4 s
        assert await leases.acquire([3]) == [3]
        assert leases.held() == [3]
        await asyncio.sleep(0.2)
        assert await leases.acquire([1]) == [1]
        held = leases.held()
        assert held == [1, 3]
        held.append(99)  # a caller's copy, not the lease table
        assert leases.held() == [1, 3]
        await asyncio.sleep(0.25)  # past 3's deadline, not 1's
        assert leases.held() == [1] and not leases.holds(3)
        await asyncio.sleep(0.2)
        assert leases.held() == []
        await leases.release([1, 3])
    finally:
        await handle.close()


async def test_suspended_leases_are_not_held_until_renewed_and_lost_if_redis_was_emptied(
    redis_server: RedisServer,
) -> None:
    handle = RedisHandle(redis_server.url, "leasetest")
    try:
        leases = Leases(handle, "r1", ttl_seconds=5)
        assert await leases.acquire([0, 1]) == [0, 1]
        leases.suspend()
        assert leases.held() == [] and not leases.holds(0)
        assert await leases.renew() == []
        assert leases.held() == [0, 1]

        await handle.client.flushall()  # Redis restarted empty
        leases.suspend()
        assert leases.held() == []
        assert await leases.renew() == [0, 1]
        assert leases.held() == []
    finally:
        await handle.close()


async def test_entries_a_dead_reader_left_pending_are_claimed_by_the_owner(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(router_cluster, "STALE_PENDING_MS", 500)
    monkeypatch.setattr(router_cluster, "STALE_SWEEP_SECONDS", 0.5)
    async with router_in_process(redis_server.url, "r-own", "stale") as (router, dsn):
        await router.start()
        await wait_for_partitions(router, 4)

        n = Notification.create("default", "e", {"i": 1}, default_ttl=60)
        key = router.keys.partition(0)
        async with router.lock:  # the router cannot read meanwhile
            await PartitionProducer(router.redis).append(
                [(0, encode_accepted(n, Target("user", user_ids=("off",))))])
            # Another router reads it, then dies (or lets the partition go) unrouted.
            read = await router.redis.client.xreadgroup(GROUP, "ghost", {key: ">"}, count=10)
            assert read and read[0][1], "the ghost reader got nothing"

        conn = await asyncpg.connect(dsn)
        try:
            deadline = time.monotonic() + 10
            while not await conn.fetchval(
                "SELECT count(*) FROM ara_mailbox WHERE notification_id = $1", n.id
            ):
                assert time.monotonic() < deadline, "the stranded entry was never routed"
                await asyncio.sleep(0.1)
        finally:
            await conn.close()
        assert router.metrics.router_claimed._value.get() >= 1
        pending = await router.redis.client.xpending(key, GROUP)
        assert pending["pending"] == 0
