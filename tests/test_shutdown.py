"""Graceful shutdown of ``ara-notify serve`` on SIGTERM (PROTOCOL §2, §3, §4)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

import httpx
from conftest import EmbeddedServer, eventually, ws_connect


async def test_sigterm_drains_clients_then_exits_zero(serve_process: Any) -> None:
    proc = await serve_process(DRAIN_TIMEOUT_SECONDS=2)
    ready_codes: list[int] = []

    async def watch_ready() -> None:
        async with httpx.AsyncClient(timeout=0.5) as http:
            while proc.running:
                try:
                    ready_codes.append((await http.get(f"{proc.base_url}/ready")).status_code)
                except httpx.HTTPError:
                    return
                await asyncio.sleep(0)

    async with proc.ws("u1") as ws, proc.sse("u2") as sse:
        async with proc.http() as http:
            assert (await http.get("/ready")).status_code == 200
        watcher = asyncio.create_task(watch_ready())
        await eventually(lambda: bool(ready_codes))
        proc.signal(signal.SIGTERM)
        frame = await ws.expect("shutdown")
        assert frame["type"] == "shutdown"
        assert frame["reason"]
        assert 1 <= frame["reconnect_after_seconds"] <= 2
        assert await ws.wait_closed() == 1001
        event = await sse.expect("shutdown")
        assert event.data["type"] == "shutdown"
        assert 1 <= event.data["reconnect_after_seconds"] <= 2
        assert await sse.wait_end() == []
        assert await proc.wait_exit() == 0
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(watcher, 5)
    assert ready_codes[0] == 200
    assert 503 in ready_codes, ready_codes
    assert 200 not in ready_codes[ready_codes.index(503):]


async def test_draining_node_is_not_ready_and_refuses_new_connections(
    server: EmbeddedServer,
) -> None:
    async with server.ws("u1") as ws:
        drain = asyncio.create_task(server.node.drain())
        frame = await ws.expect("shutdown")
        assert frame["reconnect_after_seconds"] == 1
        assert await ws.wait_closed() == 1001
        await asyncio.wait_for(drain, 5)
    ready = await server.get("/ready")
    assert ready.status_code == 503
    assert ready.json()["reason"] == "draining"
    assert (await server.get("/health")).json()["status"] == "degraded"
    async with ws_connect(server.ws_url(server.token("late")), connected=False) as late:
        refused = await late.recv_json()
        assert refused["type"] == "error"
        assert refused["code"] == "SERVICE_UNAVAILABLE"
        assert await late.wait_closed() == 1013
    async with server.sse("late", connected=False) as sse:
        assert sse.response.status_code == 503
