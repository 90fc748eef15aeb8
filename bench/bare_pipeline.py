"""Baseline for the cluster: the design's hand-offs between processes, and nothing else.

The cluster's latency and CPU per notification are the sum of two things: the
hand-offs its design requires (REST request → Redis partition stream → router →
Redis node stream → gateway → socket, each a wake-up of a process on the server
core) and the service's own work between them. This script runs the first alone,
as the same processes on the same core, so a run of ``cluster_latency.py
--pipeline`` can say how much of the cluster's cost is which:

- ``--role gateway`` (two of them): Starlette under uvicorn with the gateway's
  settings (httptools, uvloop, no compression); its sockets go through uvicorn's
  ``websockets`` implementation, where the gateway writes its own frames
  (``gateway/fastws.py``). ``POST
  /api/v1/notifications/send`` compares the API key, builds the notification
  frame once and appends it to its user's partition stream, reading where the
  user is in the same round trip (the cluster gateway's one round trip per
  send); ``/ws?user=<id>`` records the user's gateway in a Redis hash and says
  ``connected``. A reader task blocks on the gateway's own stream and writes each
  entry to its user's sockets, deleting what it read with its next read.
- ``--role router`` (one): ``XREADGROUP`` over the partition streams (the
  acknowledgements of the previous read in the same round trip), one ``HMGET``
  of the users' gateways, one pipeline of appends to the gateways' streams.

Left out, on purpose: Postgres (no mailbox row, no receipt), validation beyond
JSON parsing, authentication beyond a string compare, metrics, tracing,
idempotency, rate limits, partition leases and takeover, the router's linger.
It moves the service's frame through the same Redis commands over the service's
own pipelined connection (``RedisLane``), so what it costs is the hand-offs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
import uuid
import zlib
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from common.backends.redis_lane import RedisLane, stream_entries

API_KEY = "bench-api-key-0123456789abcdef"
GROUP = "bare"
BATCH = 500
BLOCK_MS = 200


def partition_key(prefix: str, p: int) -> str:
    return f"{prefix}:part:{{{p:04d}}}"


def node_key(prefix: str, node: str) -> str:
    return f"{prefix}:node:{{{node}}}"


def where_key(prefix: str) -> str:
    return f"{prefix}:where"


def frame_of(body: dict[str, Any]) -> tuple[str, bytes]:
    """The notification's id and its frame as the gateway sends it (encoded once per event)."""
    now = time.time()
    notification_id = str(uuid.uuid4())
    return notification_id, orjson.dumps({
        "type": "notification",
        "id": notification_id,
        "occurred_at": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "event_type": body.get("event_type", "bench"),
        "payload": body.get("payload"),
        "metadata": {"source": "http-api", "priority": "Normal"},
    })


def gateway_app(redis_url: str, prefix: str, node: str, partitions: int) -> Starlette:
    """Sends in, frames out; one lane for sends and registrations, one for the reader."""
    lane = RedisLane(redis_url)
    reads = RedisLane(redis_url, timeout=BLOCK_MS / 1000 + 5, blocking=True)
    sockets: dict[str, set[WebSocket]] = defaultdict(set)
    where = where_key(prefix)

    async def send(request: Request) -> Response:
        if request.headers.get("x-api-key") != API_KEY:
            return Response(b'{"error":"unauthorized"}', status_code=401,
                            media_type="application/json")
        body = orjson.loads(await request.body())
        user = str(body["target_user_id"])
        notification_id, frame = frame_of(body)
        p = zlib.crc32(user.encode()) % partitions
        found, _ = await lane.execute([
            ("HGET", where, user),
            ("XADD", partition_key(prefix, p), "*", "u", user, "f", frame),
        ])
        return Response(orjson.dumps({
            "success": True, "notification_id": notification_id,
            "delivered_to": int(found is not None), "failed": 0, "timestamp": time.time(),
            "queued": found is None,
        }), media_type="application/json")

    async def ready(_: Request) -> Response:
        return Response(b"ok")

    async def ws(socket: WebSocket) -> None:
        user = socket.query_params.get("user", str(uuid.uuid4()))
        await socket.accept()
        await lane.execute([("HSET", where, user, node)])
        sockets[user].add(socket)
        try:
            await socket.send_text(orjson.dumps({"type": "connected", "user_id": user}).decode())
            while True:
                await socket.receive_bytes()
        except (WebSocketDisconnect, KeyError, RuntimeError):
            pass
        finally:
            sockets[user].discard(socket)

    async def deliver() -> None:
        stream = node_key(prefix, node)
        last: str | bytes = "$"
        done: list[bytes] = []
        while True:
            commands: list[Any] = [("XDEL", stream, *done)] if done else []
            commands.append(("XREAD", "COUNT", BATCH, "BLOCK", BLOCK_MS, "STREAMS", stream, last))
            try:
                replies = await reads.execute(commands)
            except Exception:
                await asyncio.sleep(0.1)
                continue
            done = []
            for _, entries in stream_entries(replies[-1]):
                for entry_id, fields in entries:
                    last = entry_id
                    done.append(entry_id)
                    if not fields:
                        continue
                    for socket in list(sockets.get(fields[b"u"].decode(), ())):
                        with contextlib.suppress(Exception):
                            await socket.send_text(fields[b"f"].decode())

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> Any:
        task = asyncio.get_running_loop().create_task(deliver())
        yield
        task.cancel()
        await lane.close()
        await reads.close()

    return Starlette(routes=[
        Route("/api/v1/notifications/send", send, methods=["POST"]),
        Route("/ready", ready),
        WebSocketRoute("/ws", ws),
    ], lifespan=lifespan)


async def route(redis_url: str, prefix: str, partitions: int) -> None:
    """Partition streams in, gateway streams out, acknowledged with the next read."""
    lane = RedisLane(redis_url)
    reads = RedisLane(redis_url, timeout=BLOCK_MS / 1000 + 5, blocking=True)
    streams = [partition_key(prefix, p) for p in range(partitions)]
    for stream in streams:
        with contextlib.suppress(Exception):
            await lane.execute([("XGROUP", "CREATE", stream, GROUP, "0", "MKSTREAM")])
    await lane.execute([("SET", f"{prefix}:router-ready", "1")])
    routed: list[tuple[bytes, list[bytes]]] = []
    where = where_key(prefix)
    while True:
        commands: list[Any] = []
        for stream_name, ids in routed:
            commands += [("XACK", stream_name, GROUP, *ids), ("XDEL", stream_name, *ids)]
        commands.append(("XREADGROUP", "GROUP", GROUP, "router", "COUNT", BATCH, "BLOCK",
                         BLOCK_MS, "STREAMS", *streams, *(">",) * len(streams)))
        replies = await reads.execute(commands)
        read = stream_entries(replies[-1])
        routed = [(name, [entry_id for entry_id, _ in entries]) for name, entries in read]
        items = [fields for _, entries in read for _, fields in entries if fields]
        if not items:
            continue
        users = list(dict.fromkeys(fields[b"u"] for fields in items))
        (nodes,) = await lane.execute([("HMGET", where, *users)])
        node_of = dict(zip(users, nodes, strict=True))
        appends = [("XADD", node_key(prefix, node.decode()), "*", "u", fields[b"u"],
                    "f", fields[b"f"])
                   for fields in items if (node := node_of[fields[b"u"]]) is not None]
        if appends:
            await lane.execute(appends)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=("gateway", "router"), required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--node", default="bare-gw")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--partitions", type=int, default=64)
    args = parser.parse_args()
    if args.role == "router":
        import uvloop

        uvloop.run(route(args.redis, args.prefix, args.partitions))
        return
    uvicorn.run(gateway_app(args.redis, args.prefix, args.node, args.partitions),
                host="127.0.0.1", port=args.port, loop="auto", http="auto", ws="auto",
                ws_per_message_deflate=False, log_config=None, access_log=False)


if __name__ == "__main__":
    main()
