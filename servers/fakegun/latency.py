"""Latency models for the fake Mailgun, parsed from a spec string in seconds.

Accepted specs (``describe()`` returns the same canonical form, used in chart captions):

* ``fixed:0.75`` — every call takes exactly that long.
* ``uniform:0.5,1.0`` — the default: the 0.5-1 s range observed from Mailgun.
* ``lognormal:median=0.7,sigma=0.4,max=5`` — ``median = exp(mu)``; draws above ``max``
  are re-drawn (as WireMock does), so the distribution is the lognormal *conditioned*
  on ``X <= max``. ``max`` is optional.
* ``replay:PATH`` — observed latencies in seconds, one per line, ``#`` comments allowed,
  sampled uniformly at random.

Every model draws from one ``random.Random(seed)`` so a run can be repeated; the fake
Mailgun draws its faults from the same generator (``model.rng``) so that the two streams
are never correlated, which two generators with the same seed would be.

``mean()`` and ``percentile(p)`` give the theoretical values (``p`` in percent, 0-100,
like HdrHistogram's ``get_value_at_percentile``) that benchmarks compare the achieved
latencies against, and that Little's law turns into a worker count (C / mean latency).
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

from queues.errors import ConfigError

DEFAULT_LATENCY = "uniform:0.5,1.0"


class LatencySpecError(ConfigError):
    """A latency model spec such as ``uniform:0.5,1.0`` is malformed."""


FORMS = (
    "a latency spec is one of 'fixed:0.75', 'uniform:0.5,1.0', "
    "'lognormal:median=0.7,sigma=0.4,max=5' or 'replay:PATH' (seconds)"
)

_STANDARD_NORMAL = NormalDist()


@dataclass(frozen=True)
class LatencyModel(ABC):
    """A distribution of API latencies in seconds."""

    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    @abstractmethod
    def sample(self) -> float:
        """One latency in seconds, drawn from ``rng``."""

    @abstractmethod
    def mean(self) -> float:
        """The theoretical mean in seconds."""

    @abstractmethod
    def percentile(self, p: float) -> float:
        """The theoretical value at percentile ``p`` (0-100) in seconds."""

    @abstractmethod
    def describe(self) -> str:
        """The canonical spec, which :func:`parse_latency` reads back to the same model."""

    def __str__(self) -> str:
        return self.describe()


def _check_percentile(p: float) -> float:
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile must be between 0 and 100, got {p}")
    return p / 100.0


@dataclass(frozen=True)
class Fixed(LatencyModel):
    seconds: float = 0.75

    def sample(self) -> float:
        return self.seconds

    def mean(self) -> float:
        return self.seconds

    def percentile(self, p: float) -> float:
        _check_percentile(p)
        return self.seconds

    def describe(self) -> str:
        return f"fixed:{self.seconds!r}"


@dataclass(frozen=True)
class Uniform(LatencyModel):
    low: float = 0.5
    high: float = 1.0

    def sample(self) -> float:
        return self.rng.uniform(self.low, self.high)

    def mean(self) -> float:
        return (self.low + self.high) / 2

    def percentile(self, p: float) -> float:
        return self.low + (self.high - self.low) * _check_percentile(p)

    def describe(self) -> str:
        return f"uniform:{self.low!r},{self.high!r}"


@dataclass(frozen=True)
class LogNormal(LatencyModel):
    median: float = 0.7
    sigma: float = 0.4
    max: float | None = None

    @property
    def mu(self) -> float:
        return math.log(self.median)

    def _cdf_at_max(self) -> float:
        """P(X <= max) of the untruncated lognormal: the re-draw's acceptance rate."""
        if self.max is None:
            return 1.0
        if self.sigma == 0:
            return 1.0 if self.median <= self.max else 0.0
        return _STANDARD_NORMAL.cdf((math.log(self.max) - self.mu) / self.sigma)

    def sample(self) -> float:
        # Re-drawing (not clamping) keeps no probability mass piled up at max.
        while True:
            value = self.rng.lognormvariate(self.mu, self.sigma)
            if self.max is None or value <= self.max:
                return value

    def mean(self) -> float:
        # E[X | X <= m] = exp(mu + s²/2) · Φ((ln m - mu - s²)/s) / Φ((ln m - mu)/s)
        untruncated = math.exp(self.mu + self.sigma**2 / 2)
        if self.max is None or self.sigma == 0:
            return untruncated
        z = (math.log(self.max) - self.mu - self.sigma**2) / self.sigma
        return untruncated * _STANDARD_NORMAL.cdf(z) / self._cdf_at_max()

    def percentile(self, p: float) -> float:
        q = _check_percentile(p)
        if self.sigma == 0:
            return self.median
        # Conditioning on X <= max rescales the CDF: F_t(x) = F(x) / F(max).
        target = q * self._cdf_at_max()
        if target <= 0.0:
            return 0.0
        if target >= 1.0:
            return math.inf
        value = math.exp(self.mu + self.sigma * _STANDARD_NORMAL.inv_cdf(target))
        return value if self.max is None else min(value, self.max)

    def describe(self) -> str:
        text = f"lognormal:median={self.median!r},sigma={self.sigma!r}"
        return text if self.max is None else f"{text},max={self.max!r}"


@dataclass(frozen=True)
class Replay(LatencyModel):
    path: str = ""
    values: tuple[float, ...] = field(default=(), repr=False)

    def sample(self) -> float:
        return self.rng.choice(self.values)

    def mean(self) -> float:
        return math.fsum(self.values) / len(self.values)

    def percentile(self, p: float) -> float:
        # Nearest rank, the definition HdrHistogram uses: the smallest observed value
        # with at least p% of the observations at or below it.
        ordered = sorted(self.values)
        rank = max(1, math.ceil(_check_percentile(p) * len(ordered)))
        return ordered[rank - 1]

    def describe(self) -> str:
        return f"replay:{self.path}"


def _float(text: str, what: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise LatencySpecError(
            f"Latency spec {spec!r}: {what} {text.strip()!r} is not a number; {FORMS}."
        ) from None
    if not math.isfinite(value) or value < 0:
        raise LatencySpecError(
            f"Latency spec {spec!r}: {what} must be a finite number of seconds >= 0; {FORMS}."
        )
    return value


def _parse_lognormal(body: str, spec: str) -> LogNormal:
    params: dict[str, float] = {}
    for part in body.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in {"median", "sigma", "max"} or key in params:
            raise LatencySpecError(
                f"Latency spec {spec!r}: expected median=..,sigma=..[,max=..]; {FORMS}."
            )
        params[key] = _float(value, key, spec)
    if "median" not in params or "sigma" not in params:
        raise LatencySpecError(f"Latency spec {spec!r}: median and sigma are required; {FORMS}.")
    if params["median"] <= 0:
        raise LatencySpecError(f"Latency spec {spec!r}: median must be > 0; {FORMS}.")
    maximum = params.get("max")
    # Below the median more than half the draws are rejected; far below, the re-draw
    # loop would practically never end, so such a spec is refused up front.
    if maximum is not None and maximum < params["median"]:
        raise LatencySpecError(f"Latency spec {spec!r}: max must be >= median; {FORMS}.")
    return LogNormal(median=params["median"], sigma=params["sigma"], max=maximum)


def _read_replay(path_text: str, spec: str) -> tuple[float, ...]:
    if not path_text:
        raise LatencySpecError(f"Latency spec {spec!r}: replay needs a file path; {FORMS}.")
    try:
        lines = Path(path_text).read_text().splitlines()
    except OSError as exc:
        raise LatencySpecError(
            f"Latency spec {spec!r}: cannot read the replay file ({exc.strerror}); {FORMS}."
        ) from exc
    values: list[float] = []
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if text:
            values.append(_float(text, f"line {number} of {path_text}:", spec))
    if not values:
        raise LatencySpecError(
            f"Latency spec {spec!r}: the replay file {path_text} holds no latencies; {FORMS}."
        )
    return tuple(values)


def parse_latency(spec: str, seed: int | None = None) -> LatencyModel:
    """Read a latency spec (see the module docstring); raise LatencySpecError if malformed."""
    kind, sep, body = spec.strip().partition(":")
    kind = kind.strip().lower()
    rng = random.Random(seed)
    if not sep:
        raise LatencySpecError(f"Latency spec {spec!r} has no 'kind:' prefix; {FORMS}.")
    if kind == "replay":
        path_text = body.strip()
        return Replay(rng=rng, path=path_text, values=_read_replay(path_text, spec))
    if kind == "lognormal":
        model = _parse_lognormal(body, spec)
        return LogNormal(rng=rng, median=model.median, sigma=model.sigma, max=model.max)
    parts = body.split(",")
    if kind == "fixed" and len(parts) == 1:
        return Fixed(rng=rng, seconds=_float(parts[0], "the value", spec))
    if kind == "uniform" and len(parts) == 2:
        low = _float(parts[0], "the lower bound", spec)
        high = _float(parts[1], "the upper bound", spec)
        if low > high:
            raise LatencySpecError(
                f"Latency spec {spec!r}: the lower bound is above the upper bound; {FORMS}."
            )
        return Uniform(rng=rng, low=low, high=high)
    raise LatencySpecError(f"Latency spec {spec!r} is not understood; {FORMS}.")


__all__ = [
    "DEFAULT_LATENCY",
    "Fixed",
    "LatencyModel",
    "LogNormal",
    "Replay",
    "Uniform",
    "parse_latency",
]
