"""The fault table of DESIGN.md against real processes: kill -9, Redis restart, Postgres down."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time

import httpx
import pytest
from cluster_harness import (
    API_KEY,
    Client,
    PrivatePostgres,
    RedisServer,
    api,
    running_cluster,
)

from common.ring import partition_of

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]


async def _stream_sends(base: str, user: str, seconds: float, rate: int) -> list[str]:
    """Send ``rate`` notifications a second; returns the ids the API accepted, in order."""
    accepted: list[str] = []
    interval = 1.0 / rate
    async with api(base) as http:
        started = time.monotonic()
        i = 0
        while time.monotonic() - started < seconds:
            with contextlib.suppress(httpx.HTTPError):
                response = await http.post("/api/v1/notifications/send", json={
                    "target_user_id": user, "event_type": "stream", "payload": {"i": i}})
                if response.status_code == 200 and response.json()["success"]:
                    accepted.append(response.json()["notification_id"])
            i += 1
            next_at = started + i * interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    return accepted


def _first_seen_order(frames: list[dict]) -> list[str]:
    order: list[str] = []
    seen: set[str] = set()
    for frame in frames:
        if frame["type"] == "notification" and frame["id"] not in seen:
            seen.add(frame["id"])
            order.append(frame["id"])
    return order


async def _collect_until(client: Client, wanted: set[str], within: float) -> None:
    deadline = time.monotonic() + within
    while not wanted <= {f["id"] for f in client.frames if f["type"] == "notification"}:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            frame = await client.recv(min(remaining, 1.0))
            if frame["type"] == "notification":
                await client.ack(frame["id"])


async def test_killing_a_router_during_a_stream_loses_nothing_and_keeps_order(tmp_path):
    async with running_cluster(tmp_path, gateways=2, routers=2) as cluster:
        a, b = cluster.gateways()
        user = "stream-user"
        partition = partition_of("default", user, 64)
        async with api(a.base) as http:
            status = (await http.get("/api/v1/cluster/status")).json()
        owner_id = next(r["router_id"] for r in status["routers"] if partition in r["partitions"])
        owner = next(p for p in cluster.routers() if p.node_id == owner_id)
        async with Client.connect(a.ws, cluster.token(user)) as client:
            sender = asyncio.create_task(_stream_sends(b.base, user, seconds=4, rate=100))
            await asyncio.sleep(1.0)
            owner.popen.send_signal(signal.SIGKILL)
            accepted = await sender
            assert len(accepted) >= 300
            await _collect_until(client, set(accepted), within=30)
            order = _first_seen_order(client.frames)
            assert set(accepted) <= set(order), f"lost {len(set(accepted) - set(order))}"
            assert [i for i in order if i in set(accepted)] == accepted


async def test_killing_the_clients_gateway_loses_no_user_notification(tmp_path):
    env = {"QUEUE_MAX_SIZE_PER_USER": "2000"}
    async with running_cluster(tmp_path, gateways=2, routers=1, env=env) as cluster:
        a, b = cluster.gateways()
        user = "mover"
        token = cluster.token(user)
        frames: list[dict] = []
        async with Client.connect(a.ws, token) as client:
            sender = asyncio.create_task(_stream_sends(b.base, user, seconds=4, rate=100))
            await asyncio.sleep(1.0)
            a.popen.send_signal(signal.SIGKILL)
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await client.read_until_closed(timeout=5)
            frames.extend(client.frames)
        async with Client.connect(b.ws, token) as again:
            accepted = await sender
            await _collect_until(again, set(accepted), within=30)
            frames.extend(again.frames)
        received = set(_first_seen_order(frames))
        missing = set(accepted) - received
        assert not missing, f"{len(missing)} of {len(accepted)} accepted notifications lost"


async def test_redis_restart_keeps_sockets_and_rest_fails_fast_then_recovers(tmp_path):
    redis = RedisServer()
    redis.start()
    try:
        async with running_cluster(tmp_path, gateways=2, routers=1, redis=redis) as cluster:
            a, b = cluster.gateways()
            async with Client.connect(a.ws, cluster.token("rita")) as rita, api(b.base) as http:
                redis.kill()
                started = time.monotonic()
                response = await http.post("/api/v1/notifications/send", json={
                    "target_user_id": "rita", "event_type": "x"})
                assert time.monotonic() - started < 2.0
                assert response.status_code == 503
                assert response.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
                ready = await http.get("/ready")
                assert ready.status_code == 503
                await rita.send({"type": "Ping"})
                assert (await rita.recv())["type"] == "pong"

                redis.start()  # same port, empty
                deadline = time.monotonic() + 20
                delivered = []
                while time.monotonic() < deadline and not delivered:
                    response = await http.post("/api/v1/notifications/send", json={
                        "target_user_id": "rita", "event_type": "after-restart"})
                    if response.status_code == 200 and response.json()["delivered_to"] == 1:
                        delivered = await rita.notifications(1, timeout=10)
                    else:
                        await asyncio.sleep(0.5)
                assert delivered and delivered[0]["event_type"] == "after-restart"
                assert (await http.get("/ready")).status_code == 200
    finally:
        redis.stop()


async def test_postgres_outage_delays_offline_events_until_it_returns(tmp_path):
    pg = PrivatePostgres()
    pg.init()
    pg.start()
    try:
        async with running_cluster(tmp_path, gateways=2, routers=1, admin_dsn=pg.dsn) as cluster:
            a, b = cluster.gateways()
            async with Client.connect(a.ws, cluster.token("online")) as online, \
                    api(b.base) as http:
                pg.stop()
                offline_ids = []
                for i in range(5):
                    response = await http.post("/api/v1/notifications/send", json={
                        "target_user_id": "offline", "event_type": "wait", "payload": {"i": i}})
                    assert response.status_code == 200, response.text
                    offline_ids.append(response.json()["notification_id"])
                live = (await http.post("/api/v1/notifications/send", json={
                    "target_user_id": "online", "event_type": "live"})).json()
                [got] = await online.notifications(1, timeout=10)
                assert got["id"] == live["notification_id"], "online users still get events"
                await asyncio.sleep(2)
                pg.start()
                deadline = time.monotonic() + 30
                received: list[dict] = []
                while time.monotonic() < deadline and len(received) < 5:
                    await asyncio.sleep(1)
                    async with Client.connect(a.ws, cluster.token("offline")) as late:
                        received = await late.notifications(5, timeout=3)
                assert [r["id"] for r in received] == offline_ids
    finally:
        pg.cleanup()


async def test_sigterm_on_a_router_hands_its_partitions_to_the_survivor(tmp_path):
    async with running_cluster(tmp_path, gateways=1, routers=2) as cluster:
        first, second = cluster.routers()
        first.signal(signal.SIGTERM)
        first.popen.wait(15)
        [gw] = cluster.gateways()
        deadline = time.monotonic() + 15
        async with httpx.AsyncClient(headers={"X-API-Key": API_KEY}) as http:
            while time.monotonic() < deadline:
                status = (await http.get(gw.base + "/api/v1/cluster/status")).json()
                mine = next(r for r in status["routers"] if r["router_id"] == second.node_id)
                if len(mine["partitions"]) == status["partitions"]:
                    break
                await asyncio.sleep(0.3)
            assert len(mine["partitions"]) == status["partitions"]
            assert first.node_id not in {r["router_id"] for r in status["routers"]}
