"""Run a module under cProfile timed by the process's CPU clock, for attribution.

    ARA_BENCH_CPROFILE_DIR=/tmp/prof python bench/cluster_latency.py --rates 500

py-spy samples wall time: on the benchmarks' shared server core a process
preempted inside a socket write (the woken reader runs first) shows up as
time spent writing. Timing cProfile by ``time.process_time`` charges only
CPU the process itself used. The stats (``pstats`` format) are written when
the module returns, e.g. after a SIGTERM's graceful shutdown.

    python bench/_cprofile_run.py OUT.prof MODULE [ARGS...]
"""

from __future__ import annotations

import cProfile
import runpy
import signal
import sys
import time
from types import FrameType


def _exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    # uvicorn re-raises the SIGTERM it handled once it has shut down; with the default
    # disposition that would end the process before the stats are written.
    signal.signal(signal.SIGTERM, _exit)
    out, module = sys.argv[1], sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    profile = cProfile.Profile(time.process_time)
    profile.enable()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        profile.disable()
        profile.dump_stats(out)


if __name__ == "__main__":
    main()
