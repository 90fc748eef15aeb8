"""The baseline: a bare ``websockets`` (asyncio API) fan-out server, compression off.

Clients connect to ``/ws?user=<id>`` and may send ``Subscribe`` frames (the
same shape as the gateway's); a driver connects to ``/control`` and sends one
JSON command per event::

    {"op": "broadcast" | "channel" | "user", "channel": "c", "user": "u",
     "event_type": "...", "payload": {...}}

The server builds the same notification JSON the gateway sends (once per
event), writes it with ``websockets.broadcast`` to the matching sockets and
answers ``{"delivered_to": n}``. It runs on uvloop like the gateway (uvicorn
picks uvloop when installed); ``--loop asyncio`` switches that off.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import orjson
import websockets
from websockets.asyncio.server import ServerConnection, serve

CONNS: set[ServerConnection] = set()
BY_CHANNEL: dict[str, set[ServerConnection]] = defaultdict(set)
BY_USER: dict[str, set[ServerConnection]] = defaultdict(set)


def notification(op: dict, channel: str | None) -> str:  # type: ignore[type-arg]
    metadata = {"source": "http-api", "priority": "Normal"}
    if channel:
        metadata["channel"] = channel
    now = time.time()
    return orjson.dumps({
        "type": "notification",
        "id": str(uuid.uuid4()),
        "occurred_at": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "event_type": op.get("event_type", "bench"),
        "payload": op.get("payload"),
        "metadata": metadata,
    }).decode()


async def control(ws: ServerConnection) -> None:
    async for message in ws:
        op = orjson.loads(message)
        kind = op["op"]
        if kind == "broadcast":
            targets: set[ServerConnection] = CONNS
            frame = notification(op, None)
        elif kind == "channel":
            targets = BY_CHANNEL.get(op["channel"], set())
            frame = notification(op, op["channel"])
        else:
            targets = BY_USER.get(op["user"], set())
            frame = notification(op, None)
        websockets.broadcast(targets, frame)
        await ws.send(orjson.dumps({"delivered_to": len(targets)}).decode())


async def client(ws: ServerConnection) -> None:
    query = parse_qs(urlsplit(ws.request.path).query)  # type: ignore[union-attr]
    user = query.get("user", [str(uuid.uuid4())])[0]
    CONNS.add(ws)
    BY_USER[user].add(ws)
    channels: set[str] = set()
    try:
        await ws.send(orjson.dumps({"type": "connected", "user_id": user}).decode())
        async for message in ws:
            frame = orjson.loads(message)
            if frame.get("type") == "Subscribe":
                names = frame["payload"]["channels"]
                for name in names:
                    BY_CHANNEL[name].add(ws)
                    channels.add(name)
                await ws.send(orjson.dumps({"type": "subscribed", "payload": names}).decode())
            elif frame.get("type") == "Ping":
                await ws.send('{"type":"pong"}')
    finally:
        CONNS.discard(ws)
        BY_USER[user].discard(ws)
        for name in channels:
            BY_CHANNEL[name].discard(ws)


async def handler(ws: ServerConnection) -> None:
    if ws.request is not None and ws.request.path.startswith("/control"):
        await control(ws)
    else:
        await client(ws)


async def main(port: int) -> None:
    async with serve(handler, "127.0.0.1", port, compression=None, max_size=65536,
                     backlog=4096) as server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(main(args.port))
    else:
        asyncio.run(main(args.port))
