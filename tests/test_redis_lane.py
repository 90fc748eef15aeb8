"""The pipelined Redis lane: replies reach the right caller, failures fail fast and heal.

Runs against a private redis-server so the fault cases can stop and kill it.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator

import pytest
from cluster_harness import RedisServer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common.backends.redis_client import RedisHandle
from common.backends.redis_lane import RedisLane, pairs_to_dict, stream_entries
from common.errors import BackendUnavailable

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(60)]


@pytest.fixture
async def lane(redis_server: RedisServer) -> AsyncIterator[RedisLane]:
    lane = RedisLane(redis_server.url, timeout=1.0)
    try:
        yield lane
    finally:
        await lane.close()


async def test_concurrent_callers_each_get_their_own_replies_in_order(lane: RedisLane) -> None:
    async def caller(i: int) -> list[object]:
        return await lane.execute([("SET", f"k{i}", i), ("INCR", f"k{i}"), ("GET", f"k{i}")])

    results = await asyncio.gather(*(caller(i) for i in range(300)))
    for i, replies in enumerate(results):
        assert replies[1:] == [i + 1, str(i + 1).encode()]


async def test_an_error_reply_is_returned_in_place_and_the_lane_stays_in_step(
    lane: RedisLane,
) -> None:
    replies = await lane.execute([("SET", "s", "x"), ("INCR", "s"), ("GET", "s")])
    assert isinstance(replies[1], ResponseError)
    assert replies[2] == b"x"
    assert await lane.execute([("PING",)]) == [b"PONG"]


async def test_the_handle_raises_error_replies_unless_asked_to_keep_them(
    redis_server: RedisServer,
) -> None:
    handle = RedisHandle(redis_server.url, "lane")
    try:
        with pytest.raises(ResponseError):
            await handle.execute([("SET", "s", "x"), ("INCR", "s")])
        kept = await handle.execute([("INCR", "s"), ("GET", "s")], raise_on_error=False)
        assert isinstance(kept[0], ResponseError) and kept[1] == b"x"
        assert handle.breaker.healthy, "an error reply is not an outage"
    finally:
        await handle.close()


async def test_replies_are_shaped_like_redis_py_for_hashes_and_streams(lane: RedisLane) -> None:
    await lane.execute([("HSET", "h", "a", "1", "b", "2"), ("XADD", "st", "1-1", "e", "v")])
    (row, empty, streams) = await lane.execute(
        [("HGETALL", "h"), ("HGETALL", "none"), ("XREAD", "STREAMS", "st", "0")])
    assert pairs_to_dict(row) == {b"a": b"1", b"b": b"2"}
    assert pairs_to_dict(empty) == {}
    assert stream_entries(streams) == [(b"st", [(b"1-1", {b"e": b"v"})])]
    # RESP2 shapes, as a server without HELLO 3 would send them
    assert pairs_to_dict([b"a", b"1"]) == {b"a": b"1"}
    assert stream_entries([[b"st", [[b"1-1", [b"e", b"v"]], [b"1-2", None]]]]) == [
        (b"st", [(b"1-1", {b"e": b"v"}), (b"1-2", None)])]


async def test_a_killed_server_fails_calls_in_flight_and_the_lane_reconnects_after(
    lane: RedisLane, redis_server: RedisServer,
) -> None:
    await lane.execute([("SET", "a", 1)])
    blocked = asyncio.ensure_future(lane.execute([("BLPOP", "never", 0)]))
    await asyncio.sleep(0.1)
    redis_server.kill()
    with pytest.raises((RedisConnectionError, RedisTimeoutError)):
        await asyncio.wait_for(blocked, 5)
    with pytest.raises((RedisConnectionError, RedisTimeoutError, OSError)):
        await lane.execute([("PING",)])
    redis_server.start()
    assert await lane.execute([("SET", "b", 2), ("GET", "b")]) == [b"OK", b"2"]


async def test_a_stopped_server_times_out_within_the_deadline_and_heals_on_resume(
    redis_server: RedisServer,
) -> None:
    lane = RedisLane(redis_server.url, timeout=0.5)
    assert redis_server.proc is not None
    try:
        await lane.execute([("PING",)])
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            calls = [asyncio.ensure_future(lane.execute([("INCR", "n")])) for _ in range(5)]
            for call in calls:
                with pytest.raises(RedisTimeoutError):
                    await asyncio.wait_for(call, 5)
            assert time.monotonic() - started < 2.0
            # A new connection's handshake is bounded too (the kernel still accepts).
            with pytest.raises(RedisTimeoutError):
                await asyncio.wait_for(lane.execute([("PING",)]), 5)
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        # The stale replies of the timed-out calls never reach a later caller.
        assert await lane.execute([("SET", "m", "fresh"), ("GET", "m")]) == [b"OK", b"fresh"]
    finally:
        await lane.close()


async def test_a_blocking_lane_serves_one_caller_at_a_time(redis_server: RedisServer) -> None:
    handle = RedisHandle(redis_server.url, "lane")
    lane = handle.blocking_lane(0.5)
    try:
        first = asyncio.ensure_future(
            handle.execute([("XREAD", "BLOCK", 300, "STREAMS", "s1", "$")], lane=lane))
        await asyncio.sleep(0.05)
        # Queued behind the blocking read, not pipelined into it...
        second = asyncio.ensure_future(handle.execute([("PING",)], lane=lane))
        await asyncio.sleep(0.1)
        assert not second.done()
        assert (await first) == [None]
        await second
        # ...while the shared lane is not held up by it.
        third = asyncio.ensure_future(
            handle.execute([("XREAD", "BLOCK", 300, "STREAMS", "s1", "$")], lane=lane))
        started = time.monotonic()
        await handle.execute([("PING",)])
        assert time.monotonic() - started < 0.2
        await third
    finally:
        await handle.close()


async def test_the_breaker_opens_when_redis_is_gone_and_lane_calls_fail_fast(
    redis_server: RedisServer,
) -> None:
    handle = RedisHandle(redis_server.url, "lane")
    try:
        await handle.execute([("PING",)])
        redis_server.kill()
        with pytest.raises(BackendUnavailable):
            await handle.execute([("PING",)])
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await handle.execute([("PING",)])
        assert time.monotonic() - started < 0.05, "an open breaker does not try Redis"
        redis_server.start()
        deadline = time.monotonic() + 10
        while True:
            try:
                await handle.execute([("PING",)])
                break
            except BackendUnavailable:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
        assert handle.breaker.healthy
    finally:
        await handle.close()


async def test_new_connections_do_not_look_the_client_version_up_again(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pool growing through a reconnect storm must not pay redis-py's per-connection
    ``importlib.metadata`` lookup (~0.6 ms of CPU each), and the connections still
    carry the client's name and version for ``CLIENT SETINFO`` (Redis 7.2+)."""
    import importlib.metadata

    import redis

    handle = RedisHandle(redis_server.url, "ident")
    lookups = 0
    real_version = importlib.metadata.version

    def counting_version(name: str) -> str:
        nonlocal lookups
        lookups += 1
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", counting_version)
    try:
        # Twenty concurrent calls: the pool opens a connection for each.
        infos = await asyncio.gather(*(handle.run(lambda r: r.client_info()) for _ in range(20)))
        assert len({info["id"] for info in infos}) > 1
        assert lookups == 0
        await handle.lane.execute([("PING",)])
        assert lookups == 0
        for pool in (handle.client.connection_pool, handle.blocking.connection_pool):
            identity = pool.connection_kwargs["driver_info"]
            assert (identity.formatted_name, identity.lib_version) == (
                "redis-py", redis.__version__)
    finally:
        await handle.close()
