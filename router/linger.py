"""How long the router pauses after a small read, so that the next batch gathers.

Every batch costs the router and Redis about the same whatever its size: a read
over every held partition, the session lookups, a mailbox write, the appends.
Pausing after a small read lets more entries arrive before the next one. The
pause is paid in latency by every notification of the next batch, so it only
pays off when enough of them arrive during it: at a few hundred notifications
a second a 3 ms pause gathers less than one more entry, while at 1000 a second
it about doubles the batch and cut the router's CPU per notification by about a
fifth on the benchmark host (docs/benchmarks.md, seventh round). So the router
pauses ``base`` normally, and ``busy`` once the arrival rate is such that
``busy`` gathers ``GATHER`` entries or more. The busy pause is off unless
``ROUTER_BATCH_LINGER_BUSY_MS`` is set: it paid on a noisy host whose wake-ups
were dear and cost latency on a quiet core and under a CPU hog (operations.md).

The rate is an exponentially decayed count of routed entries (time constant
``RATE_TAU_SECONDS``), updated at each read: it follows a change of traffic
within a second and does not flap on one large read.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

RATE_TAU_SECONDS = 0.5
# Entries the busy pause must be expected to gather before it is taken.
GATHER = 2.0
# A read this large is not followed by any pause: a backlog is read in full batches.
LINGER_BELOW = 100


@dataclass(slots=True)
class Linger:
    """The pause after each read: ``base`` seconds, or ``busy`` under heavy traffic.

    ``busy`` at or below ``base`` (or 0) keeps the pause at ``base`` at every rate.
    """

    base: float
    busy: float = 0.0
    rate: float = 0.0  # entries a second, decayed
    _stamp: float = field(default_factory=time.monotonic)

    @property
    def busy_rate(self) -> float:
        """Entries a second from which the busy pause is taken (inf when it never is)."""
        return GATHER / self.busy if self.busy > self.base else math.inf

    def observe(self, entries: int, now: float | None = None) -> None:
        """Count the entries one read returned."""
        now = time.monotonic() if now is None else now
        elapsed = max(0.0, now - self._stamp)
        self._stamp = now
        self.rate = self.rate * math.exp(-elapsed / RATE_TAU_SECONDS) + entries / RATE_TAU_SECONDS

    def pause(self, entries: int, now: float | None = None) -> float:
        """Count a read of ``entries`` and return how long to wait before the next one."""
        self.observe(entries, now)
        if not entries or entries >= LINGER_BELOW:
            return 0.0
        return self.busy if self.rate >= self.busy_rate else self.base
