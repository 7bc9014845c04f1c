"""What ``mailbench calibrate`` measured, and the truth it is held against.

A :class:`Measurement` is one case of the calibration server (:mod:`servers.calibration`)
under one load model, timed one way. The truth of a fixed case is its injected time at
every percentile. The truth of the stall is what a visitor arriving at a uniformly random
moment waits: the rest of a stall in progress. With ``k`` stalls of ``S`` seconds in a
window of ``T`` seconds, ``P(wait > x) = k·(S − x)/T`` for ``0 ≤ x ≤ S``, so the quantile
``q`` is ``S − (1 − q)·T/k`` where that is positive, else 0 (:func:`stall_truth_us`
computes it from the stalls the server made, a stall cut by the window's edge counting
for its part).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hdrh.histogram import HdrHistogram

PERCENTILES = (50.0, 99.0, 99.9)
STALL = "stall"
FIXED_CASES = {"0ms": 0.0, "1ms": 0.001, "10ms": 0.010, "500ms": 0.5}  # injected, seconds
CASES = (*FIXED_CASES, STALL)
FLOOR_CASE = "0ms"  # the generator's floor
STALL_S = 1.4


@dataclass(frozen=True, slots=True)
class Measurement:
    """One case under one load model, timed one way (service time or intended start)."""

    case: str
    model: str  # "closed", "open" (from intended start) or "open, service time"
    metric: str  # the recorder's histogram: "form" or "form_intended"
    samples: int
    errors: int
    measured_us: dict[float, float]
    truth_us: dict[float, float]
    held_us: dict[float, float]  # what the server itself held the requests, per its clock
    stalls: int = 0  # stalls in the measured window (the stall case)
    # The stall case: the share of requests that waited more than half a stall, as
    # measured and in truth; how much of the stall a load model sees at all.
    slow_share: float = 0.0
    true_slow_share: float = 0.0

    def error_us(self, p: float) -> float:
        return self.measured_us[p] - self.truth_us[p]


def percentiles(histogram: HdrHistogram | None) -> dict[float, float]:
    if histogram is None or not histogram.get_total_count():
        return dict.fromkeys(PERCENTILES, 0.0)
    return {p: float(histogram.get_value_at_percentile(p)) for p in PERCENTILES}


def stall_share_waiting(
    stalls: Sequence[tuple[float, float]], window: tuple[float, float], x: float
) -> float:
    """The share of ``window`` whose arrivals wait more than ``x`` seconds for the end of
    a stall: ``Σ |[start, end − x] ∩ window| / |window|``."""
    begin, end = window
    inside = sum(max(0.0, min(e - x, end) - max(s, begin)) for s, e in stalls)
    return inside / max(end - begin, 1e-9)


def share_above(histogram: HdrHistogram | None, micros: float) -> float:
    """The share of ``histogram``'s samples above ``micros``."""
    if histogram is None or not histogram.get_total_count():
        return 0.0
    above = sum(
        int(item.count_at_value_iterated_to)
        for item in histogram.get_recorded_iterator()
        if item.value_iterated_to > micros
    )
    return above / int(histogram.get_total_count())


def stall_truth_us(
    stalls: Sequence[tuple[float, float]], window: tuple[float, float]
) -> dict[float, float]:
    """What a visitor arriving at a random moment of ``window`` waits, given the stalls
    (start, end) the server made: the quantile ``x`` at which the share of the window
    whose arrivals wait more than ``x`` — ``Σ |[start, end − x] ∩ window| / |window|`` —
    falls to ``1 − q``. With ``k`` stalls of ``S`` inside the window that is the module
    docstring's ``S − (1 − q)·T/k``; a stall cut by the window's edge counts its part."""

    def share_waiting_more_than(x: float) -> float:
        return stall_share_waiting(stalls, window, x)

    truth = {}
    longest = max((e - s for s, e in stalls), default=0.0)
    for p in PERCENTILES:
        tail = 1 - p / 100
        low, high = 0.0, longest
        if share_waiting_more_than(0.0) <= tail:
            truth[p] = 0.0
            continue
        for _ in range(60):  # bisection, to far below a microsecond
            middle = (low + high) / 2
            low, high = (middle, high) if share_waiting_more_than(middle) > tail else (low, middle)
        truth[p] = high * 1_000_000
    return truth
