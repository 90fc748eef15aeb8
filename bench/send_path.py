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
partition stream with the session preview in one round trip, and its receipt
written to Postgres, as over HTTP.

Baseline, same run: ``bench/bare_rest.py``'s Starlette app (read the body,
check the key, answer a small JSON document) called the same way.

Figures: the median of ``--rounds`` rounds, as µs of CPU per send, and the
ratio to the baseline. The HTTP layer (uvicorn's httptools protocol) is not in
either figure; ``bench/rest.py`` measures it with everything else.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
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
    parser.add_argument("--name", default="send_path")
    args = parser.parse_args()
    pin_self(SERVER_CORE)
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    write_result(args.name, uvloop.run(main_async(args)))


if __name__ == "__main__":
    main()
