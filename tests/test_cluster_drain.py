"""Graceful drain of a cluster gateway: clients move to another gateway, nothing is lost."""

from __future__ import annotations

import asyncio
import contextlib
import signal

import pytest
from cluster_harness import Client, running_cluster
from test_cluster_faults import _collect_until, _first_seen_order, _stream_sends

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]


async def test_sigterm_drains_a_gateway_and_clients_resume_elsewhere_losing_nothing(tmp_path):
    env = {"DRAIN_TIMEOUT_SECONDS": "10", "QUEUE_MAX_SIZE_PER_USER": "1000"}
    async with running_cluster(tmp_path, gateways=2, routers=1, env=env) as cluster:
        a, b = cluster.gateways()
        users = [f"drain-{i}" for i in range(3)]
        tokens = {u: cluster.token(u) for u in users}
        frames: dict[str, list[dict]] = {u: [] for u in users}
        shutdowns: list[dict] = []
        async with contextlib.AsyncExitStack() as stack:
            clients = {u: await stack.enter_async_context(Client.connect(a.ws, tokens[u]))
                       for u in users}
            senders = [asyncio.create_task(_stream_sends(b.base, u, seconds=3, rate=40))
                       for u in users]
            await asyncio.sleep(1.0)
            a.signal(signal.SIGTERM)
            codes = list(await asyncio.gather(*(c.read_until_closed() for c in clients.values())))
            for user, client in clients.items():
                shutdowns.extend(f for f in client.frames if f["type"] == "shutdown")
                frames[user].extend(client.frames)
        assert len(shutdowns) == 3 and codes == [1001, 1001, 1001]
        for frame in shutdowns:
            assert 1 <= frame["reconnect_after_seconds"] <= 10
        a.popen.wait(20)
        assert a.popen.returncode == 0
        accepted = {u: await s for u, s in zip(users, senders, strict=True)}
        for user in users:
            async with Client.connect(b.ws, tokens[user]) as again:
                await _collect_until(again, set(accepted[user]), within=20)
                frames[user].extend(again.frames)
            order = _first_seen_order(frames[user])
            missing = set(accepted[user]) - set(order)
            assert not missing, f"{user}: {len(missing)} lost"
            assert [i for i in order if i in set(accepted[user])] == accepted[user]
