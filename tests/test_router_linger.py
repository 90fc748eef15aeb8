"""The router's pause after a read: base under light traffic, busy under heavy."""

from __future__ import annotations

import math

import pytest

from common.settings import Settings
from router.linger import LINGER_BELOW, RATE_TAU_SECONDS, Linger

BASE = 0.001
BUSY = 0.003


def _steady(linger: Linger, per_second: float, seconds: float, start: float = 0.0) -> float:
    """Reads of one entry each at ``per_second``; returns the last pause."""
    pause = 0.0
    reads = int(per_second * seconds)
    for i in range(1, reads + 1):
        pause = linger.pause(1, now=start + i / per_second)
    return pause


def test_rate_follows_steady_traffic() -> None:
    linger = Linger(BASE, BUSY, _stamp=0.0)
    _steady(linger, 1000, 3.0)
    assert linger.rate == pytest.approx(1000, rel=0.01)


def test_light_traffic_pauses_the_base_linger() -> None:
    linger = Linger(BASE, BUSY, _stamp=0.0)
    # 3 ms at 400/s gathers 1.2 entries: not worth the busy pause.
    assert _steady(linger, 400, 3.0) == BASE


def test_heavy_traffic_pauses_the_busy_linger() -> None:
    linger = Linger(BASE, BUSY, _stamp=0.0)
    assert linger.busy_rate == pytest.approx(2 / BUSY)
    assert _steady(linger, 1000, 3.0) == BUSY


def test_traffic_falling_off_returns_to_the_base_linger_within_a_second() -> None:
    linger = Linger(BASE, BUSY, _stamp=0.0)
    assert _steady(linger, 1000, 3.0) == BUSY
    # Ten quiet reads later (blocking reads that timed out), the rate has decayed.
    later = 3.0 + 10 * RATE_TAU_SECONDS
    assert linger.pause(1, now=later) == BASE
    assert linger.rate < 10


def test_empty_and_backlog_reads_take_no_pause() -> None:
    linger = Linger(BASE, BUSY, _stamp=0.0)
    _steady(linger, 1000, 3.0)
    assert linger.pause(0, now=3.001) == 0.0
    assert linger.pause(LINGER_BELOW, now=3.002) == 0.0


def test_one_large_read_does_not_switch_to_the_busy_linger() -> None:
    linger = Linger(BASE, BUSY, _stamp=0.0)
    _steady(linger, 50, 2.0)
    # A burst of 99 entries once: the decayed rate rises, the next small read after a
    # quiet second is light traffic again.
    linger.pause(99, now=2.01)
    assert linger.pause(1, now=3.01) == BASE


@pytest.mark.parametrize("busy", [0.0, BASE, BASE / 2])
def test_busy_linger_at_or_below_base_keeps_the_base_at_every_rate(busy: float) -> None:
    linger = Linger(BASE, busy, _stamp=0.0)
    assert linger.busy_rate == math.inf
    assert _steady(linger, 5000, 1.0) == BASE


def test_no_base_linger_pauses_only_under_heavy_traffic() -> None:
    linger = Linger(0.0, BUSY, _stamp=0.0)
    assert _steady(linger, 100, 2.0) == 0.0
    assert _steady(linger, 1000, 2.0, start=2.0) == BUSY


def test_settings_default_to_one_millisecond_and_no_busy_pause() -> None:
    settings = Settings()
    assert settings.router_batch_linger_ms == 1.0
    assert settings.router_batch_linger_busy_ms == 0.0
    linger = Linger(settings.router_batch_linger_ms / 1000,
                    settings.router_batch_linger_busy_ms / 1000, _stamp=0.0)
    assert _steady(linger, 5000, 1.0) == BASE
