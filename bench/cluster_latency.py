"""Cluster latency: REST send -> client receipt, p50/p99 at a fixed rate, 2 gateways + 1 router.

    python bench/cluster_latency.py --rates 1000 --seconds 10

Server side (core 0): a private redis-server, two gateways and one router
(``python -m common.cli gateway|router``) on a fresh Postgres database
(at-least-once, so every notification is also written to the mailbox).
``--redis-core client`` pins Redis to the clients' core instead, beside
Postgres (which is never pinned): the servers' core then holds only the
service's own processes.
Client side (this process, core 1): ``--users`` WebSocket clients split over
the two gateways, and an open-loop sender that POSTs
``/api/v1/notifications/send`` to alternating gateways on a fixed schedule.
With an even ``--users`` and even send counts (the defaults) each send lands on
the gateway that holds its user's socket; that changes none of the work, since
every notification still goes through the router and the holder's delivery
stream. ``--split`` puts every socket on gw-1 and every send on gw-0, so each
gateway's CPU is one side of the work. The latency of a notification is
from its scheduled send time (stamped in its payload) to the moment its
frame is parsed at the client, so a slow server cannot hide behind a
waiting sender.

Baseline, same run: the bare ``websockets`` server (one process, no Redis,
no Postgres) delivering the same user-targeted events at the same rate,
triggered over its control socket. With ``--pipeline``, a second baseline:
``bench/bare_pipeline.py``, two gateways and a router on the same core that
move the same sends to the same sockets through the same Redis hand-offs
(partition stream, router, gateway stream) with none of the service's own
work (no Postgres, no validation, metrics or leases): what the design's
hand-offs alone cost on this host, against which the service's share is read
(``cpu_ratio_to_pipeline`` in the summary).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
import uvloop

from bench._clients import (
    HttpClient,
    Tally,
    WsClient,
    http_connect,
    http_request,
    open_many,
)
from bench._common import (
    API_KEY,
    CLIENT_CORE,
    SERVER_CORE,
    Server,
    commit_latency,
    cores_busy,
    create_database,
    drop_database,
    gc_pauses,
    gc_pauses_between,
    get_json,
    metric_values,
    new_name,
    percentile,
    pin_self,
    postgres_backends_cpu,
    processes,
    raise_nofile,
    ratio,
    redis_command_stats,
    redis_commands_between,
    start_bare,
    start_bare_pipeline,
    start_cluster_process,
    start_profiler,
    start_redis,
    stop_profiler,
    token,
    wait_http_ok,
    write_result,
)


class Recorder:
    """Latencies, with each notification's scheduled send time (for ``slowest_windows``)."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.sent_at: list[float] = []
        self.recording = False

    def start(self) -> None:
        self.latencies, self.sent_at = [], []
        self.recording = True

    def on_text(self, _: WsClient, data: bytes) -> None:
        now = time.perf_counter()
        sent = orjson.loads(data)["payload"]["t"]
        if self.recording:
            self.latencies.append(now - sent)
            self.sent_at.append(sent)


async def connect_users(ports: list[int], users: int, tally: Tally, rec: Recorder,
                        gateway: bool) -> list[WsClient]:
    def factory(i: int) -> WsClient:
        port = ports[i % len(ports)]
        path = f"/ws?token={token(f'user-{i}')}" if gateway else f"/ws?user=user-{i}"
        return WsClient(path, f"127.0.0.1:{port}", tally, on_text=rec.on_text)

    clients: list[WsClient] = []
    for port_index, port in enumerate(ports):
        idx = [i for i in range(users) if i % len(ports) == port_index]

        async def handshake(proto: WsClient) -> None:
            hello = orjson.loads(await proto.next_text(30))
            assert hello["type"] == "connected", hello
            proto.keep_texts = False

        clients += await open_many(lambda j, idx=idx: factory(idx[j]), len(idx), port,
                                   handshake=handshake)
    return clients


async def connect_and_warm_up(args: argparse.Namespace, gws: Sequence[Server], rec: Recorder,
                              gateway: bool) -> tuple[list[WsClient], RestSender]:
    """The users' sockets and the keep-alive senders, after a two-second warm-up.

    ``--split``: every socket on the second gateway and every send to the first, so each
    gateway's CPU is one side of the work (taking sends / writing to sockets).
    """
    holders, takers = (gws[1:], gws[:1]) if args.split else (gws, gws)
    clients = await connect_users([g.port for g in holders], args.users, Tally(), rec, gateway)
    sender = RestSender([[await http_connect(g.port) for _ in range(args.http_conns)]
                         for g in takers])
    await drive(sender, min(args.rates), 2.0, args.users)
    await asyncio.sleep(1.0)
    return clients, sender


async def drive(send: Any, rate: int, seconds: float, users: int) -> tuple[int, float]:
    """Open loop: event k is due at start + k/rate; returns (sent, lag of the sender)."""
    total = int(rate * seconds)
    start = time.perf_counter() + 0.05
    worst = 0.0
    tasks: set[asyncio.Task[None]] = set()
    for k in range(total):
        due = start + k / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        worst = max(worst, time.perf_counter() - due)
        task = asyncio.ensure_future(send(f"user-{k % users}", due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    return total, worst


class RestSender:
    """Keep-alive HTTP connections to the gateways; gateways are used in turn."""

    def __init__(self, conns: list[list[HttpClient]]) -> None:
        self.free: list[asyncio.Queue[HttpClient]] = []
        for group in conns:
            queue: asyncio.Queue[HttpClient] = asyncio.Queue()
            for conn in group:
                queue.put_nowait(conn)
            self.free.append(queue)
        self.turn = 0
        self.rest_latencies: list[float] = []
        self.errors = 0

    async def __call__(self, user: str, due: float) -> None:
        queue = self.free[self.turn % len(self.free)]
        self.turn += 1
        conn = await queue.get()
        body = orjson.dumps({"target_user_id": user, "event_type": "bench.latency",
                             "payload": {"t": due}})
        raw = http_request("POST", "/api/v1/notifications/send", body,
                           {"X-API-Key": API_KEY, "Content-Type": "application/json"})
        try:
            status, _ = await conn.request(raw)
            if status != 200:
                self.errors += 1
            self.rest_latencies.append(time.perf_counter() - due)
        finally:
            queue.put_nowait(conn)


WINDOW_S = 0.1


BATCH_SAMPLES = ("ara_router_batch_entries_sum", "ara_router_batch_entries_count",
                 "ara_router_batch_seconds_sum")


def slowest_windows(rec: Recorder, count: int = 8) -> list[dict[str, float]]:
    """The ``count`` 100 ms windows of send time with the slowest notification, with
    their offset from the first send: a tail made of stalls at a fixed period (a timer,
    a purge, a collection) shows up as evenly spaced windows."""
    if not rec.sent_at:
        return []
    first = min(rec.sent_at)
    worst: dict[int, tuple[float, int]] = {}
    for sent, latency in zip(rec.sent_at, rec.latencies, strict=True):
        window = int((sent - first) / WINDOW_S)
        top, n = worst.get(window, (0.0, 0))
        worst[window] = (max(top, latency), n + 1)
    slowest = sorted(worst.items(), key=lambda kv: kv[1][0], reverse=True)[:count]
    return [{"at_s": round(w * WINDOW_S, 1), "max_ms": round(top * 1000, 2), "sent": n}
            for w, (top, n) in sorted(slowest)]


def p99_by_second(rec: Recorder) -> list[float]:
    """p99 (ms) of the notifications sent in each second of the run: a tail that grows
    through the run is a different problem from one made of a few stalls."""
    if not rec.sent_at:
        return []
    first = min(rec.sent_at)
    seconds: dict[int, list[float]] = {}
    for sent, latency in zip(rec.sent_at, rec.latencies, strict=True):
        seconds.setdefault(int(sent - first), []).append(latency * 1000)
    return [round(percentile(seconds[s], 0.99), 2) for s in sorted(seconds)]


def per_notification(servers: Sequence[Server], before: dict[str, dict[str, float]],
                     sent: int) -> dict[str, dict[str, float]]:
    """Each process's CPU (µs, user and system) and context switches since ``before``,
    per notification sent."""
    return {s.name: {k: round((v - before[s.name][k]) / sent * (1e6 if k in (
        "user", "system") else 1), 2) for k, v in s.cpu_detail().items()} for s in servers}


def summarise(latencies: list[float], expected: int) -> dict[str, Any]:
    ms = [x * 1000 for x in latencies]
    return {
        "received": len(ms),
        "expected": expected,
        "p50_ms": round(percentile(ms, 0.50), 3),
        "p90_ms": round(percentile(ms, 0.90), 3),
        "p99_ms": round(percentile(ms, 0.99), 3),
        "p999_ms": round(percentile(ms, 0.999), 3),
        "max_ms": round(max(ms), 3) if ms else None,
    }


async def run_cluster(args: argparse.Namespace) -> dict[str, Any]:
    with processes() as procs:
        redis_core = SERVER_CORE if args.redis_core == "server" else CLIENT_CORE
        redis = start_redis(procs, core=redis_core)
        redis_url = f"redis://127.0.0.1:{redis.port}/0"
        dsn = await create_database(synchronous_commit=args.pg_sync_commit == "on")
        prefix = new_name("cl")
        try:
            gws = [start_cluster_process(procs, "gateway", f"gw-{i}", redis_url, dsn, prefix)
                   for i in range(2)]
            router = start_cluster_process(procs, "router", "router-1", redis_url, dsn, prefix)
            for gw in gws:
                wait_http_ok(gw.port, "/ready")
            wait_http_ok(router.port, "/ready")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                status = get_json(gws[0].port, "/api/v1/cluster/status", {"X-API-Key": API_KEY})
                owned = {p for r in status["routers"] if r["status"] == "healthy"
                         for p in r.get("partitions", [])}
                if len(owned) == status["partitions"]:
                    break
                await asyncio.sleep(0.2)
            rec = Recorder()
            clients, sender = await connect_and_warm_up(args, gws, rec, gateway=True)
            by_rate: dict[str, Any] = {}
            for rate in args.rates:
                rec.start()
                sender.rest_latencies = []
                spies = [start_profiler(s, f"cluster_{rate}_{s.name}", gil_only=True)
                         for s in (*gws, router)] if args.profile else []
                cpu0 = {s.name: s.cpu() for s in (*gws, router, redis)}
                detail0 = {s.name: s.cpu_detail() for s in (*gws, router, redis)}
                database = dsn.rsplit("/", 1)[1]
                pg0, busy0 = postgres_backends_cpu(database), cores_busy()
                batches0 = metric_values(router.port, BATCH_SAMPLES)
                gc0 = {s.name: gc_pauses(s.port) for s in (*gws, router)}
                commands0 = redis_command_stats(redis.port)
                t0, started = time.monotonic(), time.time()
                sent, lag = await drive(sender, rate, args.seconds, args.users)
                await asyncio.sleep(1.0)
                for spy in spies:
                    if spy is not None:
                        stop_profiler(spy)
                rec.recording = False
                wall = time.monotonic() - t0
                result = summarise(rec.latencies, sent)
                result["started_unix"] = round(started, 3)
                result["slowest_windows"] = slowest_windows(rec)
                result["p99_ms_by_second"] = p99_by_second(rec)
                rest_ms = [x * 1000 for x in sender.rest_latencies]
                result["rest_p50_ms"] = round(percentile(rest_ms, 0.5), 3)
                result["rest_p99_ms"] = round(percentile(rest_ms, 0.99), 3)
                result["rest_errors"] = sender.errors
                result["sender_max_lag_ms"] = round(lag * 1000, 3)
                result["cpu_util"] = {s.name: round((s.cpu() - cpu0[s.name]) / wall, 3)
                                      for s in (*gws, router, redis)}
                # What runs on the server core: Redis only where --redis-core puts it there.
                result["server_core_util"] = round(sum(
                    v for name, v in result["cpu_util"].items()
                    if name != redis.name or redis_core == SERVER_CORE), 3)
                # Postgres is not pinned: its backends' share, and how busy each core was
                # (whatever ran there), say whether the server core was really the limit.
                result["postgres_util"] = round(
                    (postgres_backends_cpu(database) - pg0) / wall, 3)
                result["core_busy"] = [round((b - b0) / wall, 3)
                                       for b, b0 in zip(cores_busy(), busy0, strict=True)]
                # How many entries the router routed per batch (what its linger moves).
                batches = metric_values(router.port, BATCH_SAMPLES)
                count = batches[BATCH_SAMPLES[1]] - batches0[BATCH_SAMPLES[1]]
                result["router_batch_mean"] = round(
                    (batches[BATCH_SAMPLES[0]] - batches0[BATCH_SAMPLES[0]]) / count, 2
                ) if count else None
                # And how long routing one took, read to appends (wall time, ms).
                result["router_batch_ms"] = round(
                    (batches[BATCH_SAMPLES[2]] - batches0[BATCH_SAMPLES[2]]) / count * 1000, 3
                ) if count else None
                # The garbage collectors' pauses in each process over the window.
                result["gc"] = {s.name: gc_pauses_between(gc0[s.name], gc_pauses(s.port))
                                for s in (*gws, router)}
                # What Redis spent its command time on, per notification sent.
                result["redis_commands"] = redis_commands_between(
                    commands0, redis_command_stats(redis.port), sent)
                # Per notification sent: CPU (µs, user/system) and context switches.
                result["per_notification"] = per_notification((*gws, router, redis), detail0,
                                                              sent)
                # Their sum over what runs on the server core: with the bare server's figure
                # (same run), the ratio that tells a slower host from dearer code.
                result["cpu_us_per_notification"] = round(sum(
                    v["user"] + v["system"] for name, v in result["per_notification"].items()
                    if name != redis.name or redis_core == SERVER_CORE), 1)
                by_rate[str(rate)] = result
                print(f"cluster @ {rate}/s: p50 {result['p50_ms']} ms  p99 {result['p99_ms']} ms "
                      f"({result['received']}/{result['expected']}, REST p99 "
                      f"{result['rest_p99_ms']} ms, server core util "
                      f"{result['server_core_util']} ({result['cpu_us_per_notification']} µs "
                      f"CPU per notification), postgres {result['postgres_util']}, "
                      f"cores busy {result['core_busy']}, router batch "
                      f"{result['router_batch_mean']} in {result['router_batch_ms']} ms)",
                      flush=True)
                print("  gc pauses (ms, collections, over 10 ms) by generation: " + "; ".join(
                    f"{name} " + " ".join(
                        f"g{g}={v['paused_ms']}/{v['collections']:.0f}/{v['over_10ms']:.0f}"
                        for g, v in gens.items()) for name, gens in result["gc"].items()),
                    flush=True)
                print("  redis command time per notification (calls, µs): " + ", ".join(
                    f"{name} {v['calls']}/{v['us']}"
                    for name, v in list(result["redis_commands"].items())[:8]), flush=True)
                print("  slowest 100 ms windows (s from start: max ms): " + ", ".join(
                    f"{w['at_s']}: {w['max_ms']}" for w in result["slowest_windows"]), flush=True)
                print(f"  p99 ms by second: {result['p99_ms_by_second']}", flush=True)
                await asyncio.sleep(2.0)
            for c in clients:
                c.close()
            return {"by_rate": by_rate, "pg_synchronous_commit": args.pg_sync_commit,
                    "pg_commit_latency": await commit_latency(dsn)}
        finally:
            procs.stop_all()
            await drop_database(dsn)


async def run_bare(args: argparse.Namespace) -> dict[str, Any]:
    with processes() as procs:
        srv = start_bare(procs)
        tally, rec = Tally(), Recorder()
        clients = await connect_users([srv.port], args.users, tally, rec, False)
        ctl = (await open_many(lambda i: WsClient("/control", f"127.0.0.1:{srv.port}", Tally()),
                               1, srv.port))[0]
        ctl.keep_texts = False

        async def send(user: str, due: float) -> None:
            ctl.send_text(orjson.dumps({"op": "user", "user": user, "event_type": "bench.latency",
                                        "payload": {"t": due}}))

        await drive(send, min(args.rates), 2.0, args.users)
        await asyncio.sleep(1.0)
        by_rate: dict[str, Any] = {}
        for rate in args.rates:
            rec.start()
            cpu0, t0 = srv.cpu(), time.monotonic()
            sent, lag = await drive(send, rate, args.seconds, args.users)
            await asyncio.sleep(1.0)
            rec.recording = False
            result = summarise(rec.latencies, sent)
            result["slowest_windows"] = slowest_windows(rec)
            result["sender_max_lag_ms"] = round(lag * 1000, 3)
            cpu = srv.cpu() - cpu0
            result["server_core_util"] = round(cpu / (time.monotonic() - t0), 3)
            result["cpu_us_per_notification"] = round(cpu / sent * 1e6, 1)
            by_rate[str(rate)] = result
            print(f"bare    @ {rate}/s: p50 {result['p50_ms']} ms  p99 {result['p99_ms']} ms "
                  f"({result['received']}/{result['expected']}, "
                  f"{result['cpu_us_per_notification']} µs CPU per notification)", flush=True)
        for c in (*clients, ctl):
            c.close()
        return {"by_rate": by_rate}


async def run_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    """``--pipeline``: the same sends and sockets through ``bench/bare_pipeline.py``, the
    design's hand-offs with none of the service's work, on the same core as the cluster."""
    with processes() as procs:
        redis_core = SERVER_CORE if args.redis_core == "server" else CLIENT_CORE
        redis = start_redis(procs, core=redis_core)
        servers = start_bare_pipeline(procs, f"redis://127.0.0.1:{redis.port}/0", new_name("bp"))
        gws = servers[:2]
        on_core = [*servers, *([redis] if redis_core == SERVER_CORE else [])]
        rec = Recorder()
        clients, sender = await connect_and_warm_up(args, gws, rec, gateway=False)
        by_rate: dict[str, Any] = {}
        for rate in args.rates:
            rec.start()
            sender.rest_latencies = []
            detail0 = {s.name: s.cpu_detail() for s in on_core}
            t0 = time.monotonic()
            sent, lag = await drive(sender, rate, args.seconds, args.users)
            await asyncio.sleep(1.0)
            rec.recording = False
            wall = time.monotonic() - t0
            result = summarise(rec.latencies, sent)
            rest_ms = [x * 1000 for x in sender.rest_latencies]
            result["rest_p99_ms"] = round(percentile(rest_ms, 0.99), 3)
            result["rest_errors"] = sender.errors
            result["sender_max_lag_ms"] = round(lag * 1000, 3)
            result["per_notification"] = per_notification(on_core, detail0, sent)
            cpu_us = sum(v["user"] + v["system"] for v in result["per_notification"].values())
            result["cpu_us_per_notification"] = round(cpu_us, 1)
            result["server_core_util"] = round(cpu_us * sent / 1e6 / wall, 3)
            by_rate[str(rate)] = result
            print(f"pipeline @ {rate}/s: p50 {result['p50_ms']} ms  p99 {result['p99_ms']} ms "
                  f"({result['received']}/{result['expected']}, REST p99 "
                  f"{result['rest_p99_ms']} ms, server core util {result['server_core_util']} "
                  f"({result['cpu_us_per_notification']} µs CPU per notification: " + ", ".join(
                      f"{name} {v['user'] + v['system']:.0f}"
                      for name, v in result["per_notification"].items()) + "))", flush=True)
            await asyncio.sleep(2.0)
        for c in clients:
            c.close()
        return {"by_rate": by_rate}


# A busy loop pinned to the server core for ``argv[1]`` of every 5 ms: contention of a
# known size, for seeing how a setting behaves when the servers do not have the core alone.
HOG = """
import os, sys, time
if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > int(sys.argv[2]):
    os.sched_setaffinity(0, {int(sys.argv[2])})
duty, period = float(sys.argv[1]), 0.005
while True:
    start = time.perf_counter()
    while time.perf_counter() - start < period * duty:
        pass
    time.sleep(period * (1 - duty))
"""


@contextlib.contextmanager
def server_core_hog(duty: float) -> Iterator[None]:
    """``--hog``: the busy loop above on the server core while the block runs."""
    if not duty:
        yield
        return
    hog = subprocess.Popen([sys.executable, "-c", HOG, str(duty), str(SERVER_CORE)])
    try:
        yield
    finally:
        hog.kill()
        hog.wait()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with server_core_hog(args.hog):
        bare = await run_bare(args)
        pipeline = await run_pipeline(args) if args.pipeline else None
        cluster = await run_cluster(args)
    summary: dict[str, Any] = {}
    for rate in args.rates:
        c, b = cluster["by_rate"][str(rate)], bare["by_rate"][str(rate)]
        summary[str(rate)] = {
            "p50_ms": c["p50_ms"],
            "p99_ms": c["p99_ms"],
            "bare_p50_ms": b["p50_ms"],
            "bare_p99_ms": b["p99_ms"],
            "p99_ratio_to_bare": ratio(c["p99_ms"], b["p99_ms"]),
            "all_received": c["received"] == c["expected"],
            "server_core_util": c["server_core_util"],
            "cpu_us_per_notification": c["cpu_us_per_notification"],
            "bare_cpu_us_per_notification": b["cpu_us_per_notification"],
            "cpu_ratio_to_bare": ratio(c["cpu_us_per_notification"],
                                       b["cpu_us_per_notification"]),
        }
        if pipeline is not None:
            bp = pipeline["by_rate"][str(rate)]
            summary[str(rate)].update({
                "pipeline_p99_ms": bp["p99_ms"],
                "pipeline_server_core_util": bp["server_core_util"],
                "pipeline_cpu_us_per_notification": bp["cpu_us_per_notification"],
                "cpu_ratio_to_pipeline": ratio(c["cpu_us_per_notification"],
                                               bp["cpu_us_per_notification"]),
            })
    summary["target_p99_ms_max"] = 10.0
    summary["pg_synchronous_commit"] = args.pg_sync_commit
    summary["pg_commit_p99_ms"] = cluster["pg_commit_latency"]["p99_ms"]
    print("summary:", summary)
    return {"rates": args.rates, "seconds": args.seconds, "users": args.users,
            "hog": args.hog, "redis_core": args.redis_core, "split": args.split,
            "cluster": cluster, "bare": bare, "pipeline": pipeline,
            "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="1000",
                        help="comma-separated notifications per second, run in turn")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--http-conns", type=int, default=16, help="per gateway")
    parser.add_argument("--pg-sync-commit", choices=("on", "off"), default="off",
                        help="synchronous_commit of the benchmark database (see docs)")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy (--gil) the gateways and the router over each rate's window "
                             "(bench/results/profiles/cluster_<rate>_<process>.txt)")
    parser.add_argument("--hog", type=float, default=0.0,
                        help="keep the server core busy this fraction of the time with a "
                             "pinned busy loop (0 to 0.9; both the bare and the cluster runs)")
    parser.add_argument("--redis-core", choices=("server", "client"), default="server",
                        help="the core Redis is pinned to: the servers' (default, the "
                             "benchmark's rule since its first round) or the clients', "
                             "beside Postgres, as a deployment's Redis has a host of its own")
    parser.add_argument("--split", action="store_true",
                        help="attribution, not the target's figure: every WebSocket client on "
                             "gw-1 and every send to gw-0, so gw-0's CPU is taking sends and "
                             "gw-1's writing to sockets (per_notification)")
    parser.add_argument("--pipeline", action="store_true",
                        help="also run bench/bare_pipeline.py (the design's hand-offs, none of "
                             "the service's work) on the same core, same sends and sockets")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    if not 0 <= args.hog <= 0.9:
        parser.error("--hog must be between 0 and 0.9")
    args.rates = [int(r) for r in str(args.rates).split(",")]
    pin_self()
    raise_nofile()
    name = args.name or ("cluster_latency" if args.pg_sync_commit == "off"
                         else "cluster_latency_sync_commit")
    write_result(name, uvloop.run(main_async(args)))


if __name__ == "__main__":
    main()
