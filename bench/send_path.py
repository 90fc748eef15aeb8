"""CPU per send through the cluster gateway's ASGI app, in process, no HTTP server.

    python bench/send_path.py --sends 1000 --rounds 7

The end-to-end benchmarks on this shared 2-core VM swing by tens of percent
between runs; this one isolates the send path's own work so that a change to
it can be measured. One process (pinned to the server core) builds the
cluster gateway app (``create_app`` with the cluster backends: a private
redis-server and a fresh Postgres database), runs its lifespan, and calls it
with a ``POST /api/v1/notifications/send`` scope ``--sends`` times per round,
one send after another; ``time.process_time`` counts only this process's CPU,
not Redis's or Postgres's. Each send is validated, stamped, appended to its
partition stream with the session preview and its pending receipt record in
one round trip, as over HTTP (the receipt itself is the router's to write).

Baseline, same run: ``bench/bare_rest.py``'s Starlette app (read the body,
check the key, answer a small JSON document) called the same way.

Figures: the median of ``--rounds`` rounds, as µs of CPU per send, and the
ratio to the baseline. The HTTP layer (uvicorn's httptools protocol) is not in
either figure; ``bench/rest.py`` measures it with everything else.

``--instructions`` counts instead of timing: each case runs twice under
``valgrind --tool=callgrind`` (``--sends`` and ``--sends`` + ``--extra``), and the
difference in instructions executed, divided by ``--extra``, is the figure per
send: start-up and warm-up cancel out, and the count does not move with the
load on the machine (only with the code, the Python build and the data). It
counts this process's user-space instructions only: not the kernel's work in
its system calls, nor Redis's or Postgres's. About a minute per run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
import uvloop

from bench._common import (
    API_KEY,
    JWT_SECRET,
    SERVER_CORE,
    create_database,
    drop_database,
    new_name,
    pin_self,
    processes,
    start_redis,
    write_result,
)

PATH = "/api/v1/notifications/send"


def _scope(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": PATH, "raw_path": PATH.encode(), "query_string": b"",
            "root_path": "", "headers": headers, "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8080), "state": {}}


async def measure(app: Any, sends: int, rounds: int) -> list[float]:
    """µs of CPU per send, one figure per round (after a warm-up)."""
    body = orjson.dumps({"target_user_id": "user-1", "event_type": "bench.send",
                         "payload": {"t": 1.0}})
    headers = [(b"host", b"127.0.0.1:8080"), (b"x-api-key", API_KEY.encode()),
               (b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    statuses: set[int] = set()

    async def one() -> None:
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # never: the app reads one message
            raise AssertionError

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.add(message["status"])

        await app(_scope(headers), receive, send)

    for _ in range(300):
        await one()
    figures = []
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(sends):
            await one()
        figures.append((time.process_time() - started) / sends * 1e6)
    if statuses != {200}:
        raise RuntimeError(f"unexpected statuses {sorted(statuses)}")
    return figures


async def gateway_figures(args: argparse.Namespace) -> list[float]:
    from common.settings import Settings
    from gateway.app import create_app
    from gateway.cluster import cluster_backends

    with processes() as procs:
        redis = start_redis(procs)
        dsn = await create_database(synchronous_commit=False)
        try:
            settings = Settings(
                redis_url=f"redis://127.0.0.1:{redis.port}/0", database_url=dsn,
                redis_key_prefix=new_name("sp"), node_id="gw-send-path", api_key=API_KEY,
                jwt_secret=JWT_SECRET, ratelimit_enabled=False, log_level="WARNING",
            )
            app = create_app(settings, cluster_backends)
            async with app.router.lifespan_context(app):
                return await measure(app, args.sends, args.rounds)
        finally:
            await drop_database(dsn)


async def child(args: argparse.Namespace) -> None:
    """One case, one round, nothing written: what ``--instructions`` runs under valgrind."""
    from bench.bare_rest import app as bare_app

    if args.cases == "bare":
        await measure(bare_app, args.sends, 1)
    else:
        await gateway_figures(args)


def instructions(case: str, sends: int) -> int:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("--instructions needs valgrind")
    run = subprocess.run(
        [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
         __file__, "--child", "--cases", case, "--sends", str(sends), "--rounds", "1"],
        capture_output=True, text=True, timeout=1800, check=False,
    )
    found = re.search(r"Collected : (\d+)", run.stderr)
    if run.returncode != 0 or found is None:
        raise RuntimeError(f"valgrind run failed ({run.returncode}): {run.stderr[-2000:]}")
    return int(found.group(1))


def count_instructions(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"sends": args.sends, "extra": args.extra}
    for case in ("bare", "gateway"):
        base, more = instructions(case, args.sends), instructions(case, args.sends + args.extra)
        result[f"{case}_instructions_per_send"] = round((more - base) / args.extra)
        print(f"{case:8s}: {result[f'{case}_instructions_per_send']:,} instructions/send",
              flush=True)
    result["gateway_ratio_to_bare"] = round(
        result["gateway_instructions_per_send"] / result["bare_instructions_per_send"], 2)
    print(f"gateway : {result['gateway_ratio_to_bare']}x bare")
    return result


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from bench.bare_rest import app as bare_app

    bare = await measure(bare_app, args.sends, args.rounds)
    gateway = await gateway_figures(args)
    result = {
        "bare_us_per_send": round(statistics.median(bare), 1),
        "gateway_us_per_send": round(statistics.median(gateway), 1),
        "bare_rounds": [round(x, 1) for x in bare],
        "gateway_rounds": [round(x, 1) for x in gateway],
    }
    result["gateway_ratio_to_bare"] = round(
        result["gateway_us_per_send"] / result["bare_us_per_send"], 2)
    print(f"bare    : {result['bare_us_per_send']} us CPU/send (rounds {result['bare_rounds']})")
    print(f"gateway : {result['gateway_us_per_send']} us CPU/send "
          f"(rounds {result['gateway_rounds']}), {result['gateway_ratio_to_bare']}x bare")
    return {"sends": args.sends, "rounds": args.rounds, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sends", type=int, default=1000, help="sends per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--name", default=None)
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions per send under valgrind instead of timing")
    parser.add_argument("--extra", type=int, default=500,
                        help="with --instructions: sends added in the second run")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cases", default="gateway", help=argparse.SUPPRESS)
    args = parser.parse_args()
    pin_self(SERVER_CORE)
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    if args.child:
        uvloop.run(child(args))
    elif args.instructions:
        write_result(args.name or "send_path_instructions", count_instructions(args))
    else:
        write_result(args.name or "send_path", uvloop.run(main_async(args)))


if __name__ == "__main__":
    main()
