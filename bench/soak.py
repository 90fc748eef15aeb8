"""Soak run: minutes of reconnect churn against a small cluster; do memory and Redis stay flat?

    python bench/soak.py                       # 3 minutes, 2 gateways, 1 router
    python bench/soak.py --duration 600 --workers 60

Not part of CI. It starts a private redis-server, a throwaway Postgres database
and ``ara-notify`` gateway/router processes (``tests/cluster_harness.py``), then
runs, for ``--duration`` seconds:

- ``--workers`` churners, each connecting a WebSocket (or, one in four, an SSE
  stream) as one of ``--users`` users to a random gateway, subscribing to a
  shared channel and to a channel named for this connection only, staying
  0.2-2 s while ACKing what arrives, then leaving: politely (close frame) or
  abruptly (TCP reset), alternately;
- a sender posting user, channel and broadcast notifications at ``--rate``/s.

Every ``--sample`` seconds it records each gateway's and router's RSS, Redis
``DBSIZE``, ``used_memory``, the key count per key kind (``sess``, ``chan``,
``part``, ...), the cardinality of the sets that only grow by adding
(``chans:{tenant}``, ``tenants``), stream lengths and ``ara_mailbox`` rows.
After a warm-up fifth of the run it compares the mean of the first and last
third of the samples of each series and prints whether it stayed flat.
Everything goes to ``bench/results/soak.json``; the exit status is 1 when a
series grew. Every process it starts is stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import asyncpg  # noqa: E402
import httpx  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
import websockets  # noqa: E402
from cluster_harness import API_KEY, Cluster, running_cluster  # noqa: E402

RESULT = ROOT / "bench" / "results" / "soak.json"
TENANT = "default"


def rss_mib(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Churn:
    """Connect, subscribe, linger, leave; again and again."""

    def __init__(self, cluster: Cluster, users: int) -> None:
        self.cluster = cluster
        self.users = users
        self.stats: Counter[str] = Counter()
        self.tokens = {u: cluster.token(f"soak-{u}") for u in range(users)}

    async def worker(self, index: int, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            user = random.randrange(self.users)
            gateway = random.choice(self.cluster.gateways())
            try:
                if (index + n) % 4 == 0:
                    await self._sse(gateway.base, user)
                else:
                    await self._ws(gateway.ws, user, abrupt=n % 2 == 0)
            except (OSError, TimeoutError, websockets.WebSocketException, httpx.HTTPError) as exc:
                self.stats[f"error:{type(exc).__name__}"] += 1
                await asyncio.sleep(0.2)

    async def _ws(self, url: str, user: int, abrupt: bool) -> None:
        async with websockets.connect(f"{url}?token={self.tokens[user]}", open_timeout=5,
                                      close_timeout=1) as ws:
            await asyncio.wait_for(ws.recv(), 5)
            self.stats["ws"] += 1
            own = f"room-{uuid.uuid4().hex[:12]}"
            await ws.send(json.dumps({"type": "Subscribe",
                                      "payload": {"channels": ["news", own]}}))
            deadline = time.monotonic() + random.uniform(0.2, 2.0)
            while (left := deadline - time.monotonic()) > 0:
                with contextlib.suppress(TimeoutError):
                    frame = json.loads(await asyncio.wait_for(ws.recv(), left))
                    if frame.get("type") == "notification":
                        self.stats["received"] += 1
                        await ws.send(json.dumps({"type": "Ack",
                                                  "payload": {"notification_id": frame["id"]}}))
            if abrupt:
                ws.transport.abort()  # no close frame, TCP reset
                self.stats["aborted"] += 1

    async def _sse(self, base: str, user: int) -> None:
        params = {"token": self.tokens[user], "channels": f"news,room-{uuid.uuid4().hex[:12]}"}
        async with httpx.AsyncClient(timeout=httpx.Timeout(5, read=3)) as http:
            async with http.stream("GET", base + "/sse", params=params) as response:
                self.stats["sse"] += 1
                deadline = time.monotonic() + random.uniform(0.2, 2.0)
                with contextlib.suppress(httpx.ReadTimeout):
                    async for line in response.aiter_lines():
                        if line.startswith("event: notification"):
                            self.stats["received"] += 1
                        if time.monotonic() > deadline:
                            break


async def sender(cluster: Cluster, users: int, rate: float, stop: asyncio.Event,
                 stats: Counter[str]) -> None:
    gateways = cluster.gateways()
    clients = [httpx.AsyncClient(base_url=g.base, timeout=5, headers={"X-API-Key": API_KEY})
               for g in gateways]
    n = 0
    started = time.monotonic()
    try:
        while not stop.is_set():
            n += 1
            client = clients[n % len(clients)]
            if n % 10 == 0:
                path, body = "/api/v1/notifications/channel", {"channel": "news"}
            elif n % 50 == 1:
                path, body = "/api/v1/notifications/broadcast", {}
            else:
                path, body = "/api/v1/notifications/send", {
                    "target_user_id": f"soak-{random.randrange(users)}"}
            body.update(event_type="soak", payload={"n": n}, ttl=120)
            try:
                response = await client.post(path, json=body)
                stats[f"send:{response.status_code}"] += 1
            except httpx.HTTPError as exc:
                stats[f"send:{type(exc).__name__}"] += 1
            await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
    finally:
        for client in clients:
            await client.aclose()


async def sample(cluster: Cluster, started: float) -> dict[str, Any]:
    prefix = cluster.prefix
    point: dict[str, Any] = {"t": round(time.monotonic() - started, 1)}
    for proc in cluster.procs:
        if proc.alive():
            point[f"rss_mib.{proc.kind}.{proc.node_id}"] = round(rss_mib(proc.popen.pid), 1)
    r = aioredis.Redis.from_url(cluster.redis_url)
    try:
        point["redis.dbsize"] = await r.dbsize()
        point["redis.used_memory_mib"] = round(
            (await r.info("memory"))["used_memory"] / 2**20, 2)
        kinds: Counter[str] = Counter()
        entries: Counter[str] = Counter()
        async for key in r.scan_iter(match=f"{prefix}:*", count=1000):
            kind = key.decode().split(":", 2)[1]
            kinds[kind] += 1
            if kind in ("part", "node"):
                entries[kind] += await r.xlen(key)
        for kind, count in sorted(kinds.items()):
            point[f"keys.{kind}"] = count
        point["entries.partition_streams"] = entries["part"]
        point["entries.gateway_streams"] = entries["node"]
        point["set.chans"] = await r.scard(f"{prefix}:chans:{{{TENANT}}}")
        point["set.tenants"] = await r.scard(f"{prefix}:tenants")
        point["hash.sess_fields"] = sum([
            await r.hlen(k) async for k in r.scan_iter(match=f"{prefix}:sess:*", count=1000)])
    finally:
        await r.aclose()
    conn = await asyncpg.connect(cluster.database_url)
    try:
        point["pg.mailbox_rows"] = await conn.fetchval("SELECT count(*) FROM ara_mailbox")
    finally:
        await conn.close()
    async with httpx.AsyncClient(timeout=5, headers={"X-API-Key": API_KEY}) as http:
        status = (await http.get(cluster.gateways()[0].base + "/api/v1/cluster/status")).json()
        point["open_connections"] = status["total_connections"]
    return point


# A gateway trims its delivery stream once it has read 1000 entries past the last trim, so
# that series is a sawtooth: it is judged by its peak, not by its trend.
TRIM_BOUND = 2000


def verdicts(samples: list[dict[str, Any]], rss_tolerance: float,
             gateways: int) -> dict[str, dict[str, Any]]:
    """Flat = the last third's mean is within tolerance of the first third's (after warm-up)."""
    steady = samples[len(samples) // 5:]
    third = max(1, len(steady) // 3)
    head, tail = steady[:third], steady[-third:]
    result = {}
    names = sorted({k for s in steady for k in s} - {"t"})
    for name in names:
        first = [s[name] for s in head if name in s]
        last = [s[name] for s in tail if name in s]
        if not first or not last:
            continue
        a, b = sum(first) / len(first), sum(last) / len(last)
        if name == "entries.gateway_streams":
            peak = max(s[name] for s in steady if name in s)
            result[name] = {"first": round(a, 2), "last": round(b, 2),
                            "flat": peak <= TRIM_BOUND * gateways, "peak": peak}
            continue
        if name.startswith("rss_mib"):
            flat = b <= a * (1 + rss_tolerance) + 2.0
        elif name in ("open_connections", "entries.partition_streams", "pg.mailbox_rows",
                      "keys.rl",
                      "hash.sess_fields") or name.startswith("redis.used_memory"):
            flat = b <= a * 1.25 + 10  # depends on momentary load, not on history
        else:
            flat = b <= a * 1.10 + 3
        result[name] = {"first": round(a, 2), "last": round(b, 2), "flat": flat}
    return result


async def soak(args: argparse.Namespace, tmp: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    env = {"QUEUE_MESSAGE_TTL_SECONDS": "120", "WEBSOCKET_MAX_CONNECTIONS_PER_USER": "50"}
    samples: list[dict[str, Any]] = []
    started = time.monotonic()
    async with running_cluster(tmp, gateways=args.gateways, routers=args.routers,
                               env=env) as cluster:
        churn = Churn(cluster, args.users)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(churn.worker(i, stop)) for i in range(args.workers)]
        tasks.append(asyncio.create_task(sender(cluster, args.users, args.rate, stop,
                                                churn.stats)))
        try:
            while time.monotonic() - started < args.duration:
                await asyncio.sleep(args.sample)
                point = await sample(cluster, started)
                samples.append(point)
                rss = {k.split(".", 2)[2]: v for k, v in point.items() if k.startswith("rss")}
                print(f"t={point['t']:>6}s rss={rss} dbsize={point['redis.dbsize']}"
                      f" chans={point['set.chans']} conns={point['open_connections']}"
                      f" churn={dict(churn.stats)}", flush=True)
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        info = {"processes": {p.node_id: p.popen.pid for p in cluster.procs},
                "churn": dict(churn.stats)}
    return samples, info


def main(args: argparse.Namespace) -> int:
    tmp = ROOT / "bench" / "results" / f"soak-{uuid.uuid4().hex[:6]}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        samples, info = asyncio.run(soak(args, tmp))
    finally:
        for child in tmp.iterdir():
            child.unlink()
        tmp.rmdir()
    result = verdicts(samples, args.rss_tolerance, args.gateways)
    grown = sorted(name for name, v in result.items() if not v["flat"])
    print("\nseries                                   first      last   flat")
    for name, v in result.items():
        print(f"{name:<40} {v['first']:>8} {v['last']:>9}   {'yes' if v['flat'] else 'NO'}")
    print("\nverdict:", "flat" if not grown else f"growing: {', '.join(grown)}")
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps({
        "config": vars(args), **info, "samples": samples, "verdicts": result, "grown": grown,
    }, indent=2))
    print(f"wrote {RESULT}")
    return 1 if grown else 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=180, help="seconds of churn")
    parser.add_argument("--workers", type=int, default=40, help="concurrent churning clients")
    parser.add_argument("--users", type=int, default=200, help="distinct user ids")
    parser.add_argument("--rate", type=float, default=30, help="notifications per second")
    parser.add_argument("--sample", type=float, default=10, help="seconds between samples")
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--routers", type=int, default=1)
    parser.add_argument("--rss-tolerance", type=float, default=0.10,
                        help="allowed relative RSS growth between first and last third")
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(main(parse_args()))
