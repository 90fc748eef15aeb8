"""Idle memory per connection at N connections: gateway WS and SSE vs the bare server.

    python bench/memory.py --connections 5000

For each case a fresh server is started pinned to core 0. This process
(core 1) opens ``--warmup`` connections first (so one-time allocations do
not count), reads the server's RSS, opens ``--connections`` more, waits for
the server to settle, reads RSS again: the per-connection figure is the RSS
delta divided by the number of connections added. Every connection has
completed its handshake and received its ``connected`` frame.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
import uvloop

from bench._clients import SseClient, Tally, WsClient, open_many
from bench._common import (
    Server,
    pin_self,
    processes,
    raise_nofile,
    ratio,
    start_bare,
    start_embedded,
    token,
    write_result,
)


async def settle(srv: Server, seconds: float) -> int:
    """RSS after it stops moving (or ``seconds``), in bytes."""
    last = srv.rss()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = srv.rss()
        if abs(now - last) < 64 * 1024:
            return now
        last = now
    return last


async def open_clients(kind: str, transport: str, port: int, start: int, n: int,
                       tokens: list[str]) -> list[Any]:
    host = f"127.0.0.1:{port}"
    tally = Tally()

    if transport == "sse":
        def factory(i: int) -> Any:
            return SseClient(f"/sse?token={tokens[start + i]}", host, tally)

        async def handshake(proto: SseClient) -> None:
            await asyncio.wait_for(proto.got_connected, 30)
    else:
        def factory(i: int) -> Any:
            path = (f"/ws?token={tokens[start + i]}" if kind == "gateway"
                    else f"/ws?user=user-{start + i}")
            return WsClient(path, host, tally)

        async def handshake(proto: WsClient) -> None:
            hello = orjson.loads(await proto.next_text(30))
            assert hello["type"] == "connected", hello
            proto.keep_texts = False

    return await open_many(factory, n, port, concurrency=100, handshake=handshake)


async def measure(kind: str, transport: str, srv: Server, warmup: int, n: int) -> dict[str, Any]:
    tokens = [token(f"user-{i}") for i in range(warmup + n)] if kind == "gateway" else []
    warm = await open_clients(kind, transport, srv.port, 0, warmup, tokens)
    base = await settle(srv, 5)
    t0 = time.monotonic()
    rest = await open_clients(kind, transport, srv.port, warmup, n, tokens)
    opened = time.monotonic() - t0
    full = await settle(srv, 10)
    for c in warm + rest:
        c.close()
    await asyncio.sleep(0.5)
    per = (full - base) / n
    return {
        "server": kind,
        "transport": transport,
        "connections": n,
        "warmup_connections": warmup,
        "rss_before_mb": round(base / 2**20, 2),
        "rss_after_mb": round(full / 2**20, 2),
        "bytes_per_connection": round(per),
        "kb_per_connection": round(per / 1024, 2),
        "open_s": round(opened, 2),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    cases = [("bare", "ws"), ("gateway", "ws"), ("gateway", "sse")]
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = [c for c in cases if f"{c[0]}-{c[1]}" in wanted]
    runs: list[dict[str, Any]] = []
    with processes() as procs:
        for kind, transport in cases:
            srv = start_bare(procs) if kind == "bare" else start_embedded(procs)
            try:
                result = await measure(kind, transport, srv, args.warmup, args.connections)
            finally:
                srv.stop()
                procs.servers.remove(srv)
            runs.append(result)
            print(f"{kind:8s} {transport:4s} {args.connections} conns: "
                  f"{result['kb_per_connection']:6.2f} KiB/conn "
                  f"(RSS {result['rss_before_mb']} -> {result['rss_after_mb']} MiB)", flush=True)
    bare = next((r for r in runs if r["server"] == "bare"), None)
    summary: dict[str, Any] = {}
    if bare:
        for r in runs:
            if r["server"] == "gateway":
                summary[f"gateway_{r['transport']}_vs_bare_ws"] = ratio(
                    r["bytes_per_connection"], bare["bytes_per_connection"])
        summary["target_ws_ratio_max"] = 1.5
        print("ratios:", summary)
    return {"connections": args.connections, "runs": runs, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--cases", default="", help="e.g. bare-ws,gateway-ws,gateway-sse")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    pin_self()
    raise_nofile()
    result = uvloop.run(main_async(args))
    write_result(args.name or f"memory_{args.connections}", result)


if __name__ == "__main__":
    main()
