"""Graceful drain of a cluster gateway: clients move to another gateway, nothing is lost."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal

import pytest
import websockets
from cluster_harness import Client, api, running_cluster
from test_cluster_faults import _collect_until, _first_seen_order, _stream_sends
from websockets.protocol import State

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
            # Only what the drained gateway had not delivered comes back, so wait for
            # the union of both sessions to hold every accepted id, not the new one alone.
            seen = {f["id"] for f in frames[user] if f["type"] == "notification"}
            async with Client.connect(b.ws, tokens[user]) as again:
                await _collect_until(again, set(accepted[user]) - seen, within=20)
                frames[user].extend(again.frames)
            order = _first_seen_order(frames[user])
            missing = set(accepted[user]) - set(order)
            assert not missing, f"{user}: {len(missing)} lost"
            assert [i for i in order if i in set(accepted[user])] == accepted[user]


async def test_a_client_that_is_behind_still_reads_its_shutdown_frame(tmp_path):
    """The drain waits for the client's close reply before the process closes the socket.

    The client stops reading with a backlog (its WebSocket library then stops reading the
    socket too, so the ``shutdown`` and close frames wait in the kernel), and ACKs each
    notification as it catches up. Were the socket closed before the client answered the
    close frame, its first ACK would draw a reset, the next write would fail, and the
    client would lose everything still unread: the ``shutdown`` frame ends with it (1006).
    """
    env = {"DRAIN_TIMEOUT_SECONDS": "5"}
    async with running_cluster(tmp_path, gateways=2, routers=1, env=env) as cluster:
        a, b = cluster.gateways()
        user, backlog = "behind-1", 60
        async with websockets.connect(f"{a.ws}?token={cluster.token(user)}",
                                      open_timeout=5) as ws:
            assert json.loads(await ws.recv())["type"] == "connected"
            async with api(b.base) as http:
                for i in range(backlog):
                    sent = await http.post("/api/v1/notifications/send", json={
                        "target_user_id": user, "event_type": "backlog", "payload": {"i": i}})
                    assert sent.status_code == 200
            await asyncio.sleep(1.0)  # routed and written to the socket, not read
            a.signal(signal.SIGTERM)
            await asyncio.sleep(0.5)  # the drain has written its frames by now
            types: list[str] = []
            with contextlib.suppress(websockets.ConnectionClosed):
                while True:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    types.append(frame["type"])
                    # No ACK once the close frame is in: websockets would hold the send
                    # until it sees the TCP close, which it does not read while behind.
                    if frame["type"] == "notification" and ws.state is State.OPEN:
                        with contextlib.suppress(websockets.ConnectionClosed):
                            await ws.send(json.dumps(
                                {"type": "Ack", "payload": {"notification_id": frame["id"]}}))
        assert ws.close_code == 1001, (ws.close_code, repr(ws.connection_exc), types[-3:])
        assert types.count("notification") == backlog
        assert types[-1] == "shutdown"
        a.popen.wait(20)
        assert a.popen.returncode == 0
