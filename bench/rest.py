"""REST send throughput of one gateway: requests per second and server CPU per request.

    python bench/rest.py --seconds 10 --concurrency 32

Closed loop: ``--concurrency`` keep-alive connections from this process
(core 1) each POST ``/api/v1/notifications/send`` back to back for
``--seconds`` to one server pinned to core 0. Cases, each against a fresh
server:

- ``bare``: a bare Starlette app under the same uvicorn settings (baseline);
- ``cluster``: a cluster gateway (``common.cli gateway``) with its private
  redis-server on core 1 and a fresh Postgres database; each send is
  validated, stamped, appended to its partition stream (no router runs, so
  the streams only grow) with its pending receipt record, and answered from
  a session-store read (the receipt itself is the router's to write);
- ``embedded``: the embedded node (``common.cli serve``): routed inline,
  offline user queued in SQLite.
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

from bench._clients import http_connect, http_request
from bench._common import (
    API_KEY,
    BENCH,
    CLIENT_CORE,
    Server,
    create_database,
    drop_database,
    free_port,
    new_name,
    percentile,
    pin_self,
    processes,
    ratio,
    self_cpu,
    start_cluster_process,
    start_embedded,
    start_profiler,
    start_redis,
    stop_profiler,
    wait_http_ok,
    write_result,
)


async def load(srv: Server, seconds: float, concurrency: int, users: int,
               profile: str | None) -> dict[str, Any]:
    conns = [await http_connect(srv.port) for _ in range(concurrency)]
    lat: list[float] = []
    errors = 0
    statuses: dict[str, int] = {}

    def request(i: int) -> bytes:
        body = orjson.dumps({"target_user_id": f"user-{i % users}", "event_type": "order.shipped",
                             "payload": {"order_id": f"ORD-{i}", "amount": 99.5}})
        return http_request("POST", "/api/v1/notifications/send", body,
                            {"X-API-Key": API_KEY, "Content-Type": "application/json"})

    async def worker(k: int, until: float, record: bool) -> int:
        nonlocal errors
        conn = conns[k]
        done = 0
        i = k
        while time.monotonic() < until:
            t = time.perf_counter()
            try:
                status, reply = await conn.request(request(i))
            except ConnectionError as exc:
                errors += 1
                statuses[type(exc).__name__] = statuses.get(type(exc).__name__, 0) + 1
                conn = conns[k] = await http_connect(srv.port)
                continue
            if record:
                lat.append(time.perf_counter() - t)
                if status != 200:
                    errors += 1
                    key = f"{status} {reply[:80]!r}"
                    statuses[key] = statuses.get(key, 0) + 1
            done += 1
            i += concurrency
        return done

    warm = time.monotonic() + min(2.0, seconds / 4)
    await asyncio.gather(*(worker(k, warm, False) for k in range(concurrency)))
    spy = start_profiler(srv, profile) if profile else None
    cpu0, mine0, t0 = srv.cpu(), self_cpu(), time.monotonic()
    counts = await asyncio.gather(*(worker(k, t0 + seconds, True) for k in range(concurrency)))
    wall = time.monotonic() - t0
    cpu, mine = srv.cpu() - cpu0, self_cpu() - mine0
    if spy is not None:
        stop_profiler(spy)
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    total = sum(counts)
    ms = [x * 1000 for x in lat]
    return {
        "requests": total,
        "errors": errors,
        "error_kinds": statuses,
        "requests_per_s": round(total / wall),
        "server_cpu_util": round(cpu / wall, 3),
        "server_cpu_us_per_request": round(cpu / total * 1e6, 1),
        "client_cpu_util": round(mine / wall, 3),
        "p50_ms": round(percentile(ms, 0.5), 3),
        "p99_ms": round(percentile(ms, 0.99), 3),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    cases = args.cases.split(",")
    with processes() as procs:
        for case in cases:
            dsn = None
            if case == "bare":
                port = free_port()
                srv = procs.start("bare-rest", [sys.executable, str(BENCH / "bare_rest.py"),
                                                "--port", str(port)], port=port)
            elif case == "embedded":
                srv = start_embedded(procs)
            else:
                redis = start_redis(procs, core=CLIENT_CORE)
                dsn = await create_database(synchronous_commit=args.pg_sync_commit == "on")
                srv = start_cluster_process(procs, "gateway", "gw-rest",
                                            f"redis://127.0.0.1:{redis.port}/0", dsn,
                                            new_name("rs"))
                wait_http_ok(srv.port, "/ready")
            try:
                runs[case] = await load(srv, args.seconds, args.concurrency, args.users,
                                        f"rest_{case}" if args.profile else None)
            finally:
                procs.stop_all()
                if dsn:
                    await drop_database(dsn)
            r = runs[case]
            print(f"{case:9s}: {r['requests_per_s']:>6} req/s, {r['server_cpu_us_per_request']} us "
                  f"CPU/request, server util {r['server_cpu_util']}, p50 {r['p50_ms']} ms, "
                  f"p99 {r['p99_ms']} ms, errors {r['errors']}, "
                  f"client util {r['client_cpu_util']}", flush=True)
    summary: dict[str, Any] = {}
    if "bare" in runs:
        for case in cases:
            if case != "bare":
                summary[f"{case}_rps_ratio_to_bare"] = ratio(runs[case]["requests_per_s"],
                                                             runs["bare"]["requests_per_s"])
                summary[f"{case}_cpu_ratio_to_bare"] = ratio(
                    runs[case]["server_cpu_us_per_request"],
                    runs["bare"]["server_cpu_us_per_request"])
    print("summary:", summary)
    return {"seconds": args.seconds, "concurrency": args.concurrency,
            "pg_synchronous_commit": args.pg_sync_commit, "runs": runs, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--cases", default="bare,cluster,embedded")
    parser.add_argument("--pg-sync-commit", choices=("on", "off"), default="off")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--name", default="rest")
    args = parser.parse_args()
    pin_self()
    write_result(args.name, uvloop.run(main_async(args)))


if __name__ == "__main__":
    main()
