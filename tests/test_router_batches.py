"""What the router reports about its batches: how many entries each one routed together."""

from __future__ import annotations

import asyncio
import time

import pytest
from cluster_harness import RedisServer, router_in_process, wait_for_partitions

from common.backends.redis_streams import PartitionProducer, encode_accepted
from common.protocol import Notification, Target

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(60)]


async def test_entries_read_together_are_counted_as_one_batch(redis_server: RedisServer) -> None:
    async with router_in_process(redis_server.url, "r-batch", "batches") as (router, _):
        await router.start()
        await wait_for_partitions(router, 4)
        sample = router.metrics.registry.get_sample_value
        notes = [Notification.create("default", "e", {"i": i}, default_ttl=60)
                 for i in range(5)]
        async with router.lock:  # the router cannot read until all five are there
            await PartitionProducer(router.redis).append(
                [(p, encode_accepted(n, Target("user", user_ids=(f"off-{i}",))))
                 for i, (p, n) in enumerate(zip((0, 1, 0, 2, 3), notes, strict=True))])
        deadline = time.monotonic() + 10
        while router.routed < 5:
            assert time.monotonic() < deadline, "the entries were never routed"
            await asyncio.sleep(0.05)
        assert sample("ara_router_batch_entries_count") == 1
        assert sample("ara_router_batch_entries_sum") == 5
        assert sample("ara_router_batch_entries_bucket", {"le": "4.0"}) == 0
        assert sample("ara_router_batch_entries_bucket", {"le": "6.0"}) == 1
