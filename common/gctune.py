"""The cyclic garbage collector of the long-running server processes.

Routing allocates many short-lived containers per notification (decoded JSON,
reports, ASGI messages), and reference counting frees nearly all of them; with
the default gen-0 threshold (700) the router's collector still ran thousands of
times a second for nothing. At 100k it cost 15-35 % less CPU per notification in
``bench/router_throughput.py``. Objects made at startup (modules, settings,
compiled validators) are frozen out of every collection. Applied to the router
process; on a gateway's send path it made no difference measurable above noise
(the in-process send endpoint, 3000 calls), and a gateway under load hardly
collects at all (``bench/cluster_latency.py`` records the pauses: at 1000
notifications a second, one gen-0 collection in ten seconds).

``GcPauses`` times every collection into ``ara_gc_pause_seconds``, so an operator
can tell whether the collector is what shows in a latency tail: a full
collection of an unfrozen gateway walks ~74k startup objects, ~37 ms here.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from prometheus_client import Histogram

GC_GEN0_THRESHOLD = 100_000


def tune_gc() -> None:
    """Raise the gen-0 threshold and freeze what exists now (call once, after setup)."""
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


class GcPauses:
    """Times each collection of this process into a histogram labelled by generation.

    ``gc.callbacks`` is process-wide: ``start`` registers once, ``stop`` removes it
    (tests build several apps in one process).
    """

    def __init__(self, histogram: Histogram) -> None:
        self._children = [histogram.labels(str(generation)) for generation in range(3)]
        self._started = 0.0

    def start(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._children[info["generation"]].observe(time.perf_counter() - self._started)
