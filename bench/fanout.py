"""Broadcast and channel fan-out: server CPU per delivered message, gateway vs bare.

    python bench/fanout.py --clients 1000
    python bench/fanout.py --clients 5000

For each server (the bare ``websockets`` baseline, then the gateway as the
embedded node) it opens N WebSocket clients from this process (pinned to
core 1; the server runs pinned to core 0), subscribes them to one channel,
warms up, then triggers events (bare: a control socket; gateway: the REST
API, ``POST /api/v1/notifications/broadcast|channel``), keeping a few
events in flight, until ``--messages`` notifications have been received.
Server CPU is its user+system time over that window; every notification is
counted at the client before the window closes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
import uvloop

from bench._clients import (
    Tally,
    WsClient,
    http_connect,
    http_request,
    open_many,
)
from bench._common import (
    API_KEY,
    Server,
    pin_self,
    processes,
    raise_nofile,
    ratio,
    self_cpu,
    start_bare,
    start_embedded,
    start_profiler,
    stop_profiler,
    token,
    write_result,
)

CHANNEL = "bench"
PAYLOAD = {
    "order_id": "ORD-2026-000123",
    "status": "shipped",
    "amount": 99.5,
    "currency": "EUR",
    "items": [{"sku": "SKU-1", "qty": 2}, {"sku": "SKU-7", "qty": 1}],
    "message": "Your order has shipped and is on its way.",
}

Trigger = Callable[[], Awaitable[None]]


async def connect_clients(server: str, port: int, n: int, tally: Tally) -> list[WsClient]:
    host = f"127.0.0.1:{port}"
    tokens = [token(f"user-{i}") for i in range(n)] if server == "gateway" else []

    def factory(i: int) -> WsClient:
        path = f"/ws?token={tokens[i]}" if tokens else f"/ws?user=user-{i}"
        return WsClient(path, host, tally)

    async def handshake(proto: WsClient) -> None:
        hello = orjson.loads(await proto.next_text(30))
        assert hello["type"] == "connected", hello
        proto.send_text(orjson.dumps({"type": "Subscribe", "payload": {"channels": [CHANNEL]}}))
        reply = orjson.loads(await proto.next_text(30))
        assert reply["type"] == "subscribed", reply
        proto.keep_texts = False

    return await open_many(factory, n, port, concurrency=100, handshake=handshake)


async def make_trigger(server: str, port: int, mode: str) -> tuple[Trigger, Callable[[], None]]:
    if server == "bare":
        tally = Tally()
        ctl = (await open_many(lambda i: WsClient("/control", f"127.0.0.1:{port}", tally), 1,
                               port))[0]
        op = {"op": mode, "channel": CHANNEL, "event_type": "order.shipped", "payload": PAYLOAD}
        body = orjson.dumps(op)

        async def bare() -> None:
            ctl.send_text(body)
            await ctl.next_text(30)

        return bare, ctl.close
    http = await http_connect(port)
    path = "/api/v1/notifications/broadcast" if mode == "broadcast" else \
        "/api/v1/notifications/channel"
    content: dict[str, Any] = {"event_type": "order.shipped", "payload": PAYLOAD}
    if mode == "channel":
        content["channel"] = CHANNEL
    raw = http_request("POST", path, orjson.dumps(content),
                       {"X-API-Key": API_KEY, "Content-Type": "application/json"})

    async def rest() -> None:
        status, reply = await http.request(raw)
        if status != 200:
            raise RuntimeError(f"trigger failed {status}: {reply[:200]!r}")

    def close() -> None:
        if http.transport is not None:
            http.transport.close()

    return rest, close


async def run_events(trigger: Trigger, tally: Tally, n: int, events: int, window: int) -> bool:
    base = tally.notifications
    for i in range(events):
        if i >= window:
            ok = await tally.wait_for(base + (i - window + 1) * n, 60)
            if not ok:
                return False
        await trigger()
    return await tally.wait_for(base + events * n, 120)


async def measure(server_kind: str, srv: Server, n: int, mode: str, messages: int,
                  window: int, profile: bool = False) -> dict[str, Any]:
    tally = Tally()
    t0 = time.monotonic()
    clients = await connect_clients(server_kind, srv.port, n, tally)
    connect_s = time.monotonic() - t0
    trigger, close_trigger = await make_trigger(server_kind, srv.port, mode)
    events = max(10, messages // n)
    # warm-up: code paths, caches, TCP windows
    if not await run_events(trigger, tally, n, max(5, events // 10), window):
        raise RuntimeError(f"{server_kind}: warm-up deliveries missing ({tally.notifications})")
    await asyncio.sleep(0.5)
    start_notes = tally.notifications
    spy = start_profiler(srv, f"{server_kind}_{mode}_{n}") if profile else None
    cpu0, mine0, wall0 = srv.cpu(), self_cpu(), time.monotonic()
    ok = await run_events(trigger, tally, n, events, window)
    wall = time.monotonic() - wall0
    cpu, mine = srv.cpu() - cpu0, self_cpu() - mine0
    if spy is not None:
        stop_profiler(spy)
    delivered = tally.notifications - start_notes
    close_trigger()
    for c in clients:
        c.close()
    await asyncio.sleep(0.5)
    if not ok:
        raise RuntimeError(f"{server_kind}: only {delivered} of {events * n} delivered")
    return {
        "server": server_kind,
        "mode": mode,
        "clients": n,
        "events": events,
        "delivered": delivered,
        "wall_s": round(wall, 3),
        "server_cpu_s": round(cpu, 3),
        "server_cpu_us_per_msg": round(cpu / delivered * 1e6, 3),
        "server_cpu_util": round(cpu / wall, 3),
        "client_cpu_util": round(mine / wall, 3),
        "throughput_msgs_per_s": round(delivered / wall),
        "throughput_per_server_cpu_s": round(delivered / cpu) if cpu else None,
        "connect_s": round(connect_s, 2),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    modes = ["broadcast", "channel"] if args.mode == "both" else [args.mode]
    runs: list[dict[str, Any]] = []
    with processes() as procs:
        for kind in args.servers.split(","):
            for mode in modes:
                srv = start_bare(procs) if kind == "bare" else start_embedded(procs)
                try:
                    result = await measure(kind, srv, args.clients, mode, args.messages,
                                           args.window, args.profile)
                finally:
                    srv.stop()
                    procs.servers.remove(srv)
                runs.append(result)
                print(f"{kind:8s} {mode:9s} n={args.clients}: "
                      f"{result['server_cpu_us_per_msg']:7.2f} us/msg server CPU, "
                      f"{result['throughput_msgs_per_s']:>8} msgs/s wall, "
                      f"server util {result['server_cpu_util']:.2f}, "
                      f"client util {result['client_cpu_util']:.2f}", flush=True)
    summary: dict[str, Any] = {}
    for mode in modes:
        bare = next((r for r in runs if r["server"] == "bare" and r["mode"] == mode), None)
        gw = next((r for r in runs if r["server"] == "gateway" and r["mode"] == mode), None)
        if bare and gw:
            summary[mode] = {
                "cpu_per_msg_ratio": ratio(gw["server_cpu_us_per_msg"],
                                           bare["server_cpu_us_per_msg"]),
                "throughput_share": ratio(bare["server_cpu_us_per_msg"],
                                          gw["server_cpu_us_per_msg"]),
                "gateway_us_per_msg": gw["server_cpu_us_per_msg"],
                "bare_us_per_msg": bare["server_cpu_us_per_msg"],
                "target_ratio_max": 1.4,
            }
            print(f"{mode}: gateway/bare CPU per message = "
                  f"{summary[mode]['cpu_per_msg_ratio']} (target <= 1.4)")
    return {"clients": args.clients, "runs": runs, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--mode", choices=("broadcast", "channel", "both"), default="both")
    parser.add_argument("--messages", type=int, default=300_000,
                        help="notifications to deliver in the measured window, per run")
    parser.add_argument("--window", type=int, default=4, help="events in flight")
    parser.add_argument("--servers", default="bare,gateway")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy the server over the window (bench/results/profiles/)")
    parser.add_argument("--name", default=None, help="result file name (default fanout_<N>)")
    args = parser.parse_args()
    pin_self()
    raise_nofile()
    result = uvloop.run(main_async(args))
    write_result(args.name or f"fanout_{args.clients}", result)


if __name__ == "__main__":
    main()
