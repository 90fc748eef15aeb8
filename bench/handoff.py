"""What one hand-off between two processes on the server core costs, by how busy the core is.

    python bench/handoff.py --round-trips 5000 --rate 1000

A notification crosses about ten process hand-offs on the servers' core of
``cluster_latency.py`` (gateway, Redis, router, Postgres's reply, Redis,
gateway...). This measures one kind: a Redis round trip (``PING``) through
the service's own client (``RedisHandle.execute`` on its lane, uvloop), with
the client and a private ``redis-server`` pinned to the server core together,
as the cluster benchmark pins them.

- ``back_to_back`` (the baseline): each ``PING`` goes out as soon as the last
  reply is in, so neither process waits long and the core never idles.
- ``paced``: ``--rate`` round trips a second on a fixed schedule, so both
  processes sleep between round trips and are woken for each, as the
  cluster's processes live at a few hundred to a thousand notifications a
  second.
- ``wake_only``: the client keeps the same schedule and sends nothing: what a
  Python process (uvloop) pays just to be woken by its timer and go back to
  sleep.

Figures: CPU (user + system µs) per round trip of the client and of Redis
(``INFO cpu``, read before and after on the same connection), and the ratio of
paced to back-to-back: what being woken costs beyond the work itself. The
client's own CPU is counted inside its measured loop, so its start-up is not
in it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop

from bench._common import (
    SERVER_CORE,
    new_name,
    pin_self,
    processes,
    ratio,
    start_redis,
    write_result,
)

WARM_UP = 500


async def redis_cpu(handle: Any) -> float:
    """Redis's own CPU seconds so far (user + system), from ``INFO cpu``."""
    (raw,) = await handle.execute([("INFO", "cpu")])
    fields = dict(line.split(":", 1) for line in raw.decode().splitlines() if ":" in line)
    return float(fields["used_cpu_user"]) + float(fields["used_cpu_sys"])


async def child(args: argparse.Namespace) -> None:
    """One case, measured from inside the client process; prints its figures as JSON."""
    from common.backends.redis_client import RedisHandle

    handle = RedisHandle(args.redis, new_name("ho"))
    ping = [("PING",)]
    for _ in range(WARM_UP):
        await handle.execute(ping)
    lag = 0.0
    redis0 = await redis_cpu(handle)
    usage0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    if args.rate:
        for k in range(args.round_trips):
            due = t0 + k / args.rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lag = max(lag, time.perf_counter() - due)
            if not args.wake_only:
                await handle.execute(ping)
    else:
        for _ in range(args.round_trips):
            await handle.execute(ping)
    wall = time.perf_counter() - t0
    usage, redis = resource.getrusage(resource.RUSAGE_SELF), await redis_cpu(handle) - redis0
    user, system = usage.ru_utime - usage0.ru_utime, usage.ru_stime - usage0.ru_stime
    mine = user + system
    await handle.close()
    n = args.round_trips
    print(json.dumps({
        "round_trips": n,
        "client_cpu_us": round(mine / n * 1e6, 1),
        "client_user_us": round(user / n * 1e6, 1),
        "client_system_us": round(system / n * 1e6, 1),
        "redis_cpu_us": round(redis / n * 1e6, 1),
        "cpu_us": round((mine + redis) / n * 1e6, 1),
        "wall_us": round(wall / n * 1e6, 1),
        "core_util": round((mine + redis) / wall, 3),
        "sender_max_lag_ms": round(lag * 1000, 3),
    }), flush=True)


CASES = {"back_to_back": (), "paced": (), "wake_only": ("--wake-only",)}


def run_case(redis_url: str, round_trips: int, case: str, rate: int) -> dict[str, Any]:
    pin = ["taskset", "-c", str(SERVER_CORE)] if shutil.which("taskset") else []
    command = [*pin, sys.executable, __file__, "--child",
               "--redis", redis_url, "--round-trips", str(round_trips),
               "--rate", str(0 if case == "back_to_back" else rate), *CASES[case]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"client failed ({done.returncode}): {done.stderr[-2000:]}")
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--round-trips", type=int, default=5000)
    parser.add_argument("--rate", type=int, default=1000,
                        help="round trips a second in the paced case")
    parser.add_argument("--rounds", type=int, default=3, help="alternating pairs of cases")
    parser.add_argument("--redis", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--wake-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--name", default="handoff")
    args = parser.parse_args()
    if args.child:  # --rate 0: the back-to-back case
        uvloop.run(child(args))
        return
    if args.round_trips < 1 or args.rate < 1 or args.rounds < 1:
        parser.error("--round-trips, --rate and --rounds must be positive")
    pin_self()
    cases: dict[str, list[dict[str, Any]]] = {case: [] for case in CASES}
    with processes() as procs:
        redis = start_redis(procs, core=SERVER_CORE)
        url = f"redis://127.0.0.1:{redis.port}/0"
        for _ in range(args.rounds):
            for case in CASES:
                figures = run_case(url, args.round_trips, case, args.rate)
                cases[case].append(figures)
                print(f"{case:12s}: {figures['cpu_us']} µs CPU per round trip (client "
                      f"{figures['client_cpu_us']}: user {figures['client_user_us']}, system "
                      f"{figures['client_system_us']}; Redis {figures['redis_cpu_us']}), "
                      f"{figures['wall_us']} µs apart, core {figures['core_util']}", flush=True)
    per_pair = [ratio(p["cpu_us"], b["cpu_us"])
                for b, p in zip(cases["back_to_back"], cases["paced"], strict=True)]
    summary = {"paced_cpu_ratio_to_back_to_back": per_pair,
               "wake_only_client_cpu_us": [w["client_cpu_us"] for w in cases["wake_only"]],
               "rate": args.rate}
    print("summary:", summary)
    write_result(args.name, {"round_trips": args.round_trips, "rate": args.rate,
                             "cases": cases, "summary": summary})


if __name__ == "__main__":
    main()
