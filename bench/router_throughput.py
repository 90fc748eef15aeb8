"""Router throughput: routed user notifications per second of one router process.

    python bench/router_throughput.py --messages 100000

Setup: a private redis-server (core 1), a fresh Postgres database, ``--users``
users with a live session on a (simulated) gateway ``bench-node`` whose
heartbeat this script keeps fresh. ``--messages`` user-targeted notifications
are appended to their partition streams exactly as a gateway does
(``encode_accepted``, ``partition_of``), then one router process is started
pinned to core 0 and timed from its first routed entry to its last (polling
its ``/health`` ``routed`` counter). Each notification costs the router the
full at-least-once path: session lookup (for the row's ``delivered`` flag),
mailbox row and receipt in Postgres (``COPY`` and a receipts statement for a
large batch, one ``INSERT`` for a small one), session lookup after the commit
with the appends to the gateway's node stream in the same round trip,
``XACK``/``XDEL`` and the pending receipt records' ``DEL``.

Baseline, same run, same Redis and pinning: ``bench/bare_forwarder.py``,
which only moves the entries from the partition streams to a node stream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as aioredis
import uvloop

from bench._common import (
    BENCH,
    Processes,
    create_database,
    drop_database,
    get_json,
    new_name,
    pin_self,
    processes,
    ratio,
    start_cluster_process,
    start_profiler,
    start_redis,
    stop_profiler,
    wait_http_ok,
    write_result,
)
from common.backends.redis_streams import encode_accepted
from common.protocol import Notification, Target
from common.ring import partition_of

PARTITIONS = 64
NODE = "bench-node"
PAYLOAD = {"order_id": "ORD-2026-000123", "status": "shipped", "amount": 99.5}


async def register_sessions(r: aioredis.Redis, prefix: str, users: int) -> None:
    now = time.time()
    value = json.dumps({"n": NODE, "t": "websocket", "at": now, "c": []})
    async with r.pipeline(transaction=False) as pipe:
        for i in range(users):
            pipe.hset(f"{prefix}:sess:{{default:user-{i}}}", f"conn-{i}", value)
        pipe.zadd(f"{prefix}:nodes", {NODE: now})
        await pipe.execute()


async def keep_node_alive(r: aioredis.Redis, prefix: str) -> None:
    while True:
        await r.zadd(f"{prefix}:nodes", {NODE: time.time()})
        await asyncio.sleep(1)


async def prefill(r: aioredis.Redis, prefix: str, users: int, messages: int) -> None:
    rng = random.Random(7)
    chunk = 2000
    for start in range(0, messages, chunk):
        async with r.pipeline(transaction=False) as pipe:
            for _ in range(start, min(messages, start + chunk)):
                user = f"user-{rng.randrange(users)}"
                n = Notification.create("default", "order.shipped", PAYLOAD, default_ttl=3600)
                p = partition_of("default", user, PARTITIONS)
                pipe.xadd(f"{prefix}:part:{{{p:04d}}}",
                          {b"e": encode_accepted(n, Target("user", user_ids=(user,)), True)})
            await pipe.execute()


async def run_router(procs: Processes, redis_url: str, dsn: str, users: int, messages: int,
                     batch_env: dict[str, str], profile: bool) -> dict[str, Any]:
    prefix = new_name("rb")
    r = aioredis.from_url(redis_url)
    await register_sessions(r, prefix, users)
    alive = asyncio.get_running_loop().create_task(keep_node_alive(r, prefix))
    await prefill(r, prefix, users, messages)
    router = start_cluster_process(procs, "router", "router-bench", redis_url, dsn, prefix,
                                   **batch_env)
    wait_http_ok(router.port, "/health")
    first: tuple[float, int, float] | None = None
    last = (0.0, 0, 0.0)
    spy = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        routed = int(get_json(router.port, "/health")["routed"])
        now = time.monotonic()
        if routed > 0 and first is None:
            first = (now, routed, router.cpu())
            if profile:
                spy = start_profiler(router, "router")
        if routed >= messages:
            last = (now, routed, router.cpu())
            break
        await asyncio.sleep(0.02)
    if spy is not None:
        stop_profiler(spy)
    alive.cancel()
    streams_left = sum([await r.xlen(f"{prefix}:part:{{{p:04d}}}") for p in range(PARTITIONS)])
    await r.aclose()
    router.stop()
    procs.servers.remove(router)
    if first is None or last[1] < messages:
        raise RuntimeError(f"router routed {last[1]} of {messages}")
    seconds = last[0] - first[0]
    count = last[1] - first[1]
    cpu = last[2] - first[2]
    return {
        "routed": count,
        "seconds": round(seconds, 3),
        "routed_per_s": round(count / seconds),
        "router_cpu_s": round(cpu, 3),
        "router_cpu_us_per_msg": round(cpu / count * 1e6, 2),
        "router_cpu_util": round(cpu / seconds, 3),
        "stream_entries_left": streams_left,
    }


async def run_bare(procs: Processes, redis_url: str, users: int, messages: int) -> dict[str, Any]:
    prefix = new_name("bf")
    r = aioredis.from_url(redis_url)
    await prefill(r, prefix, users, messages)
    await r.aclose()
    fwd = procs.start("bare-forwarder", [sys.executable, str(BENCH / "bare_forwarder.py"),
                                         "--redis", redis_url, "--prefix", prefix,
                                         "--count", str(messages)])
    cpu0 = fwd.cpu()
    fwd.popen.wait(300)
    out = fwd.log.read_text().strip().splitlines()[-1]
    data = json.loads(out)
    procs.servers.remove(fwd)
    return {
        "forwarded": data["forwarded"],
        "seconds": round(data["seconds"], 3),
        "forwarded_per_s": round(data["forwarded"] / data["seconds"]),
        "cpu_hint_s": cpu0,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with processes() as procs:
        redis = start_redis(procs)
        redis_url = f"redis://127.0.0.1:{redis.port}/0"
        dsn = await create_database()
        try:
            bare = await run_bare(procs, redis_url, args.users, args.messages)
            print(f"bare forwarder: {bare['forwarded_per_s']} entries/s", flush=True)
            routed = await run_router(procs, redis_url, dsn, args.users, args.messages,
                                      {"DELIVERY_GUARANTEE": args.guarantee}, args.profile)
            print(f"router: {routed['routed_per_s']} routed user notifications/s "
                  f"({routed['router_cpu_us_per_msg']} us CPU each, "
                  f"util {routed['router_cpu_util']})", flush=True)
        finally:
            await drop_database(dsn)
    summary = {
        "routed_per_s": routed["routed_per_s"],
        "bare_forwarded_per_s": bare["forwarded_per_s"],
        "ratio_to_bare": ratio(routed["routed_per_s"], bare["forwarded_per_s"]),
        "target_routed_per_s_min": 20_000,
    }
    print("summary:", summary)
    return {"messages": args.messages, "users": args.users, "guarantee": args.guarantee,
            "router": routed, "bare": bare, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--guarantee", choices=("at-least-once", "at-most-once"),
                        default="at-least-once",
                        help="at-most-once skips the mailbox write for online users")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    pin_self()
    name = args.name or ("router_throughput" if args.guarantee == "at-least-once"
                         else "router_throughput_at_most_once")
    write_result(name, uvloop.run(main_async(args)))


if __name__ == "__main__":
    main()
