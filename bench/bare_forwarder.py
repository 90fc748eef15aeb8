"""Baseline for the router: a bare Redis stream forwarder, no Postgres, no sessions.

It reads partition streams with its own consumer group (``XREADGROUP``,
same batch size as the router), appends every entry unchanged to one node
stream, then ``XACK``s and ``XDEL``s it: the Redis round trips a router
cannot avoid, in the same client library, with nothing else. It exits once
``--count`` entries have been forwarded and prints the rate.
"""

from __future__ import annotations

import argparse
import json
import time

import redis.asyncio as aioredis
import uvloop
from redis.exceptions import ResponseError

GROUP = "bare"


async def main(args: argparse.Namespace) -> None:
    r = aioredis.from_url(args.redis)
    streams = [f"{args.prefix}:part:{{{p:04d}}}" for p in range(args.partitions)]
    out = f"{args.prefix}:node:{{bare-sink}}"
    for s in streams:
        try:
            await r.xgroup_create(s, GROUP, id="0", mkstream=True)
        except ResponseError:
            pass
    done = 0
    first: float | None = None
    while done < args.count:
        resp = await r.xreadgroup(GROUP, "bare-1", {s: ">" for s in streams}, count=args.batch,
                                  block=1000)
        if first is None and resp:
            first = time.monotonic()
        for stream, entries in resp or []:
            async with r.pipeline(transaction=False) as pipe:
                for _, fields in entries:
                    pipe.xadd(out, {b"d": fields[b"e"]}, maxlen=100_000, approximate=True)
                await pipe.execute()
            ids = [e[0] for e in entries]
            async with r.pipeline(transaction=False) as pipe:
                pipe.xack(stream, GROUP, *ids)
                pipe.xdel(stream, *ids)
                await pipe.execute()
            done += len(entries)
    elapsed = time.monotonic() - (first or time.monotonic())
    print(json.dumps({"forwarded": done, "seconds": elapsed}), flush=True)
    await r.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--partitions", type=int, default=64)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--count", type=int, required=True)
    uvloop.run(main(parser.parse_args()))
