"""Latency recording in microseconds with HdrHistograms.

Every latency mailbench reports goes through here: 1 µs … 1 h at 3 significant digits,
encoded in the standard HdrHistogram base64 form so that histograms from Locust workers,
servers and queue workers can be merged (never their percentiles averaged).

The ceiling is an hour because queue waits and delivery lags of a chaos run (a 300 s
drain after broker restarts and a flaky API) are real values, not outliers to cut. A
value above it is recorded *at* the ceiling rather than dropped, so counts stay right;
:func:`clamped` tells how many were, and the results say so in a note.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 3_600_000_000
SIGNIFICANT_FIGURES = 3
PERCENTILES = {"p50_us": 50.0, "p90_us": 90.0, "p99_us": 99.0, "p999_us": 99.9}


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES)


def record_us(histogram: HdrHistogram, micros: float) -> None:
    """Record one latency; values outside the trackable range are clamped, not dropped."""
    value = round(micros)
    histogram.record_value(min(max(value, LOWEST_US), HIGHEST_US))


def clamped(histogram: HdrHistogram) -> int:
    """How many values were recorded at the ceiling, that is were an hour or longer
    (:func:`record_us` clamps them there); read from the histogram alone, so it holds for
    one merged from many processes or read back from a results folder."""
    return int(histogram.get_count_at_value(HIGHEST_US))


def encode(histogram: HdrHistogram) -> str:
    return histogram.encode().decode("ascii")  # type: ignore[no-any-return]


def decode(encoded: str) -> HdrHistogram:
    histogram = new_histogram()
    if encoded:
        histogram.decode_and_add(encoded)
    return histogram


def merge(histograms: Iterable[HdrHistogram]) -> HdrHistogram:
    total = new_histogram()
    for histogram in histograms:
        total.add(histogram)
    return total


def mean_us(histogram: HdrHistogram) -> float:
    """The histogram's mean, as ``get_mean_value`` gives it (each count at the middle of
    its bucket), from its non-empty buckets only: hdrh walks all of them in Python,
    about 0.2 s for a 1 µs–1 h histogram."""
    total = int(histogram.get_total_count())
    if not total:
        return 0.0
    counts = np.ctypeslib.as_array(histogram.counts)[: histogram.counts_len]
    weighted: int = 0
    for index in np.flatnonzero(counts):
        value = histogram.get_value_from_index(int(index))
        low = histogram.get_lowest_equivalent_value(value)
        size = histogram.get_highest_equivalent_value(value) - low + 1
        weighted += int(counts[index]) * int(low + (size >> 1))
    return weighted / total


@dataclass(frozen=True, slots=True)
class Summary:
    """The percentile row that summary.csv holds for one mode and metric."""

    count: int
    mean_us: float
    p50_us: int
    p90_us: int
    p99_us: int
    p999_us: int
    max_us: int

    @classmethod
    def of(cls, histogram: HdrHistogram) -> Summary:
        if histogram.get_total_count() == 0:
            return cls(0, 0.0, 0, 0, 0, 0, 0)
        values = {k: int(histogram.get_value_at_percentile(p)) for k, p in PERCENTILES.items()}
        return cls(
            count=int(histogram.get_total_count()),
            mean_us=round(mean_us(histogram), 1),
            max_us=int(histogram.get_max_value()),
            **values,
        )


class Recorder:
    """Named histograms kept by one process (a server, a worker, a Locust runner)."""

    def __init__(self) -> None:
        self.histograms: dict[str, HdrHistogram] = {}

    def record(self, name: str, seconds: float) -> None:
        self.record_us(name, seconds * 1_000_000)

    def record_us(self, name: str, micros: float) -> None:
        histogram = self.histograms.get(name)
        if histogram is None:
            histogram = self.histograms[name] = new_histogram()
        record_us(histogram, micros)

    def add_encoded(self, encoded: Mapping[str, str]) -> None:
        for name, blob in encoded.items():
            self.histograms.setdefault(name, new_histogram()).add(decode(blob))

    def encoded(self) -> dict[str, str]:
        return {name: encode(h) for name, h in self.histograms.items()}

    def reset(self) -> None:
        self.histograms.clear()


def write_histograms(path: Path, encoded: Mapping[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(encoded), indent=1, sort_keys=True))


def read_histograms(path: Path) -> dict[str, HdrHistogram]:
    return {name: decode(blob) for name, blob in json.loads(path.read_text()).items()}
