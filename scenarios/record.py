"""What one load-generating process measured, kept as *chunks* that merge anywhere.

This module does not import Locust (which monkey-patches the interpreter), so the
plugin (:mod:`scenarios.recorder`) and the unit tests share it. A :class:`LoadRecord`
holds what was measured since its last :meth:`~LoadRecord.chunk`; a chunk is plain JSON:

* ``id`` — ``<process>/<n>``, unique: a chunk reaches the results once, however many
  files hold it (the process's own journal and the Locust master's);
* ``histograms`` — µs HdrHistograms at full precision, of the requests *sent after the
  warm-up* (``warmup_s`` from the process's first request): what summaries are made of;
* ``seconds`` — per second since the process's first request (``first_request_at``),
  every request answered in it, warm-up included, at :data:`PER_SECOND_FIGURES`
  significant digits: they only feed the timeline's p50 and p99, and 2 digits take a
  seventh of the memory of 3;
* ``errors``, ``errors_per_second``, ``counters`` (open model), ``cpu_samples``,
  ``cpu_warnings``, and the accounting's lists ``sends_ok`` (recipient, when posted),
  ``sends_failed``, ``sends_started``.

A request's latency from its *intended* start (open model, ``<name>_intended``) is
recorded whatever became of it: answered, failed, or still unanswered when the load
stopped (then from the intended start to the stop; a :class:`Visit` keeps track), so an
overloaded mode never looks better for the requests it did not serve.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

from hdrh.histogram import HdrHistogram

from servers.metrics import HIGHEST_US, LOWEST_US, Recorder

PER_SECOND_FIGURES = 2
INTENDED = "_intended"  # suffix of the histograms timed from the intended start
SERVER = "_server"  # suffix of the handler's own time, from a Server-Timing header


def per_second_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, PER_SECOND_FIGURES)


class LoadRecord:
    """What one process measured since its last chunk (see the module's docstring)."""

    def __init__(self, process: str, warmup_s: float = 0.0) -> None:
        self.process = process
        self.warmup_s = warmup_s
        self.first_request_at: float | None = None  # wall clock: the first request sent
        self._chunks = 0
        self.total = Recorder()
        self.per_second: defaultdict[int, dict[str, HdrHistogram]] = defaultdict(dict)
        self.errors: Counter[str] = Counter()
        self.errors_per_second: defaultdict[int, Counter[str]] = defaultdict(Counter)
        self.counters: Counter[str] = Counter()  # open-model starts; shared, cleared in place
        self.cpu_samples: list[float] = []
        self.cpu_warnings = 0
        self.sends_ok: list[tuple[str, float]] = []  # (recipient, when it was posted)
        self.sends_failed: list[str] = []  # recipients of sends without a 2xx
        self.sends_started: list[str] = []  # every send posted, answered or not

    # -- recording -----------------------------------------------------------------------
    def request_starting(self, at: float) -> None:
        """A request is about to be sent at ``at`` (wall clock): the first one starts the
        warm-up and second 0 of the timeline."""
        if self.first_request_at is None:
            self.first_request_at = at

    def in_warmup(self, sent_at: float) -> bool:
        first = self.first_request_at
        return first is None or sent_at < first + self.warmup_s

    def second_of(self, at: float) -> int:
        first = self.first_request_at if self.first_request_at is not None else at
        return max(0, math.floor(at - first))

    def record(
        self,
        name: str,
        micros: float,
        sent_at: float,
        answered_at: float,
        failed: bool = False,
        intended_us: float | None = None,
        server_us: float | None = None,
    ) -> None:
        """One request answered (or failed) at ``answered_at`` after ``micros`` µs, sent at
        ``sent_at``; ``intended_us`` is its time from its intended start (open model),
        ``server_us`` the handler's own time as its server reported it."""
        self.request_starting(sent_at)
        second = self.second_of(answered_at)
        steady = not self.in_warmup(sent_at)
        if intended_us is not None:
            self._add(name + INTENDED, intended_us, second, steady)
        if failed:
            self.errors_per_second[second][name] += 1
            if steady:
                self.errors[name] += 1
            return
        self._add(name, micros, second, steady)
        if server_us is not None and steady:
            self.total.record_us(name + SERVER, server_us)

    def record_unanswered(self, name: str, micros: float, intended_at: float, at: float) -> None:
        """An open-model request that had no answer when the load stopped at ``at``:
        ``micros`` from its intended start (``intended_at``, wall clock) to then."""
        self._add(name + INTENDED, micros, self.second_of(at), not self.in_warmup(intended_at))

    def _add(self, name: str, micros: float, second: int, steady: bool) -> None:
        if steady:
            self.total.record_us(name, micros)
        histograms = self.per_second[second]
        histogram = histograms.get(name)
        if histogram is None:
            histogram = histograms[name] = per_second_histogram()
        histogram.record_value(min(max(round(micros), LOWEST_US), HIGHEST_US))

    # -- chunks --------------------------------------------------------------------------
    def empty(self) -> bool:
        return not (
            self.total.histograms
            or self.per_second
            or self.errors_per_second
            or self.counters
            or self.cpu_samples
            or self.cpu_warnings
            or self.sends_ok
            or self.sends_failed
            or self.sends_started
        )

    def chunk(self, final: bool = False) -> dict[str, Any]:
        """What was recorded since the last chunk, as JSON; the record starts empty again.
        ``final``: the process's users have stopped."""
        data: dict[str, Any] = {
            "id": f"{self.process}/{self._chunks}",
            "process": self.process,
            "final": final,
            "warmup_s": self.warmup_s,
            "first_request_at": self.first_request_at,
            "histograms": self.total.encoded(),
            "seconds": {
                str(s): {n: h.encode().decode("ascii") for n, h in hs.items()}
                for s, hs in sorted(self.per_second.items())
            },
            "errors": dict(self.errors),
            "errors_per_second": {
                str(s): dict(e) for s, e in sorted(self.errors_per_second.items())
            },
            "counters": dict(self.counters),
            "cpu_samples": list(self.cpu_samples),
            "cpu_warnings": self.cpu_warnings,
            "sends_ok": list(self.sends_ok),
            "sends_failed": list(self.sends_failed),
            "sends_started": list(self.sends_started),
        }
        self._chunks += 1
        self.total.reset()
        self.per_second.clear()
        self.errors.clear()
        self.errors_per_second.clear()
        self.counters.clear()
        self.cpu_samples.clear()
        self.cpu_warnings = 0
        self.sends_ok.clear()
        self.sends_failed.clear()
        self.sends_started.clear()
        return data


class Visit:
    """One open-model visit: when it was due to start and which of its requests (in the
    order it makes them) have no answer yet.

    Each request is due when the one before it was answered, had the visit started on
    time: the first at the visit's intended start, the next that much later as the first
    took. So a request's time from its intended start is the visit's late start plus its
    own service time, and one slow request is not charged again to the next.
    """

    __slots__ = ("due", "intended", "pending", "started")

    def __init__(self, intended: float, requests: tuple[str, ...]) -> None:
        self.intended = intended  # perf_counter
        self.due = intended  # when the first unanswered request was due
        self.started: float | None = None  # when the visit got its slot
        self.pending = list(requests)

    def start(self, at: float) -> None:
        self.started = at

    def answered(self, name: str, seconds: float) -> None:
        if name in self.pending:
            self.pending.remove(name)
            self.due += seconds

    def unanswered(self, now: float) -> Iterator[tuple[str, float]]:
        """(name, seconds from its intended start until ``now``) of each request without
        an answer at ``now``: the next one was due at :attr:`due`; those after it could
        not be sent before it was answered, so they are known only to have waited as long
        as the visit's late start (or, if it never started, until now)."""
        late = now - self.intended if self.started is None else self.started - self.intended
        for i, name in enumerate(self.pending):
            yield name, (now - self.due) if i == 0 else max(0.0, late)


_METRIC = re.compile(r"\s*([!#$%&'*+\-.^_`|~0-9A-Za-z]+)\s*((?:;[^,]*)?)")
_DUR = re.compile(r";\s*dur\s*=\s*\"?([0-9.eE+-]+)\"?")
WHOLE_REQUEST = ("app", "total")


def server_time_us(header: str | None) -> float | None:
    """The server's own time for a request, in µs, from a W3C ``Server-Timing`` header:
    its ``app`` (or ``total``) metric, else the longest one (metrics may nest, so they are
    never added up); None without a duration."""
    if not header:
        return None
    durations: dict[str, float] = {}
    for part in header.split(","):
        metric = _METRIC.match(part)
        if metric is None:
            continue
        dur = _DUR.search(metric.group(2))
        if dur is None:
            continue
        try:
            value = float(dur.group(1))
        except ValueError:
            continue
        if math.isfinite(value) and value >= 0:
            durations.setdefault(metric.group(1).lower(), value)
    if not durations:
        return None
    ms = next((durations[n] for n in WHOLE_REQUEST if n in durations), max(durations.values()))
    return ms * 1000.0
