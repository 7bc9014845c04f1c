"""``mailbench calibrate``: the instrument's own error, against known service times.

The same scenario (``reader``), recorder and Locust runner as ``mailbench run`` measure a
server whose service times are known (:mod:`servers.calibration`): 0, 1, 10 and 500 ms,
and a 1.4 s stall of its whole event loop every few seconds. For each case and load model
the table gives p50, p99 and p99.9 as measured, and the error (measured − injected):

* the **0 ms case is the generator's floor**: what the client, the loopback and a
  minimal aiohttp handler add to any request;
* for 1, 10 and 500 ms, the **error above the floor** (error − the floor at the same
  percentile) says whether the generator adds anything beyond its floor to a slower
  request — the target is ≤ 50 µs at p50 and p99;
* the **stall** has a truth of its own. A visitor arriving at a uniformly random moment
  waits out the rest of a stall in progress: with ``k`` stalls of ``S`` seconds in a
  window of ``T`` seconds, ``P(wait > x) = k·(S − x)/T`` for ``0 ≤ x ≤ S``, so the
  quantile ``q`` is ``S − (1 − q)·T/k`` where that is positive, else 0. An open model
  timed from each visit's intended start (``form_intended``) should find it (within 5%
  at p99.9); the same open model's service times, and a closed model, whose few users
  each wait out a stall once instead of arriving all along, under-report it.

Each case's load is short and bounded (``--seconds``, default 10 s, the first second a
warm-up left out of the figures, as ``mailbench run`` leaves out its own). The table goes
to the console and, with the figures as JSON, to ``<out>/calibration-<id>/``.

``measure_floor`` is the short 0 ms sample that ``mailbench run`` takes at its start, under
the run's own load model, so that every report can state the generator's floor.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
from hdrh.histogram import HdrHistogram

from harness.errors import ConfigError, ProcessFailed
from harness.process import Child, Children, answered_identity, wait_ready
from harness.results.collect import read_locust
from harness.run.config import RunConfig
from harness.run.locust import LocustRun
from harness.run.target import Target
from harness.run.tiers import Tiers
from servers.metrics import decode

PERCENTILES = (50.0, 99.0, 99.9)
MODELS = ("closed", "open")
STALL = "stall"
FIXED_CASES = {"0ms": 0.0, "1ms": 0.001, "10ms": 0.010, "500ms": 0.5}
CASES = (*FIXED_CASES, STALL)
FLOOR_CASE = "0ms"
STALL_S = 1.4
ABOVE_FLOOR_LIMIT_US = 50  # at p50 and p99
STALL_TOLERANCE = 0.05  # open model, p99.9
FLOOR_SAMPLE_S = 3.0  # mailbench run's floor sample: 1 s of warm-up, 2 s measured
FLOOR_WARMUP_S = 1.0


@dataclass(frozen=True, slots=True)
class Settings:
    models: tuple[str, ...] = MODELS
    seconds: float = 10.0
    warmup_s: float = 1.0
    users: int = 20  # closed model
    rate: float = 200.0  # open model, visits per second
    stall_every_s: float = 20.0  # the first at half a period: one stall, mid-case
    cases: tuple[str, ...] = CASES
    out: Path = Path("results")
    run_id: str = field(default_factory=lambda: dt.datetime.now().strftime("%Y%m%d-%H%M%S"))

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_s < self.seconds:
            raise ConfigError(f"--seconds {self.seconds:g} must be more than the warm-up (1 s)")
        if self.users < 1 or self.rate <= 0 or self.stall_every_s <= STALL_S:
            raise ConfigError(
                f"--users and --rate must be positive, --stall-every above {STALL_S:g} s"
            )

    @property
    def folder(self) -> Path:
        return self.out / f"calibration-{self.run_id}"

    def seconds_of(self, case: str) -> float:
        """A case's load: ``seconds``; the stall's at least one period, so that a stall
        falls in its middle however short the other cases are."""
        return max(self.seconds, self.stall_every_s) if case == STALL else self.seconds


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


class CalibrationServer:
    """The server of known service times, started as a child and proven to be ours."""

    def __init__(self, children: Children, folder: Path, stall_every_s: float) -> None:
        port_file = folder / "logs" / "calibration.port"
        port_file.parent.mkdir(parents=True, exist_ok=True)
        port_file.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "servers.calibration", "--port", "0"]
        argv += ["--port-file", str(port_file), "--stall-s", f"{STALL_S:g}"]
        argv += ["--stall-every", f"{stall_every_s:g}"]
        self.child: Child = children.start(
            "calibration server", argv, folder / "logs" / "calibration.log"
        )
        port = self.child.wait_port_file(port_file)
        self.url = f"http://127.0.0.1:{port}"
        wait_ready(
            [self.child],
            lambda: answered_identity(f"{self.url}/_mailbench/stats"),
            port,
            what_to_do="stop it and try again",
        )

    def reset(self) -> None:
        httpx.post(f"{self.url}/_mailbench/reset", timeout=10).raise_for_status()

    def stats(self) -> dict[str, Any]:
        answer: dict[str, Any] = httpx.get(f"{self.url}/_mailbench/stats", timeout=10).json()
        return answer


def load_config(base: RunConfig, url: str, case: str, phase: str) -> RunConfig:
    """``base`` pointed at one case of the calibration server, through the reader scenario."""
    target = Target(url, name=phase, form_path=f"/calibrate/{case}")
    return replace(base, scenario="reader", target=target, modes=(phase,))


def drive_case(
    children: Children,
    config: RunConfig,
    server: CalibrationServer,
    case: str,
    phase: str,
    raw: Path,
    seconds: float,
    warmup_s: float,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load one case for ``seconds``; what Locust measured and what the server says."""
    server.reset()
    cfg = load_config(config, server.url, case, phase)
    tiers = Tiers(None, phase, raw, server.url, 0, None, "")
    LocustRun(cfg, children, lambda t, e: None).run(
        tiers, raw, rate=cfg.rate, duration=seconds, warmup=warmup_s
    )
    return read_locust(raw), server.stats()


def measure(settings: Settings, children: Children, base: RunConfig) -> list[Measurement]:
    folder = settings.folder
    server = CalibrationServer(children, folder, settings.stall_every_s)
    found: list[Measurement] = []
    for model in settings.models:
        config = replace(base, rate=settings.rate if model == "open" else None)
        for case in settings.cases:
            phase, seconds = f"{case}-{model}", settings.seconds_of(case)
            print(f"calibrate: {case}, {model} model, {seconds:g} s", flush=True)
            locust, stats = drive_case(
                children, config, server, case, phase, folder / "raw" / phase, seconds,
                settings.warmup_s,
            )  # fmt: skip
            found += measurements(case, model, locust, stats, settings)
    return found


def measurements(
    case: str,
    model: str,
    locust: Mapping[str, Any],
    stats: Mapping[str, Any],
    settings: Settings,
) -> list[Measurement]:
    """The rows of one case and model: closed → service time; open → from intended start,
    and its service time beside it."""
    histograms = {name: decode(blob) for name, blob in locust.get("histograms", {}).items()}
    errors = int(locust.get("errors", {}).get("form", 0))
    held = percentiles(decode(stats["held"][case]) if case in stats.get("held", {}) else None)
    stalls, true_slow = 0, 0.0
    if case == STALL:
        # The measured window: from the warm-up's end to the end of the load.
        first = float(locust.get("first_request_at") or 0.0)
        window = (first + settings.warmup_s, first + settings.seconds_of(case))
        made = [(float(s), float(e)) for s, e in stats.get("stalls", [])]
        stalls = sum(1 for s, e in made if e > window[0] and s < window[1])
        truth = stall_truth_us(made, window)
        true_slow = stall_share_waiting(made, window, STALL_S / 2)
    else:
        truth = dict.fromkeys(PERCENTILES, FIXED_CASES[case] * 1_000_000)
    timings = [("closed", "form")] if model == "closed" else []
    timings += (
        [("open", "form_intended"), ("open, service time", "form")] if model == "open" else []
    )
    rows = []
    for label, metric in timings:
        histogram = histograms.get(metric)
        rows.append(
            Measurement(
                case=case,
                model=label,
                metric=metric,
                samples=int(histogram.get_total_count()) if histogram is not None else 0,
                errors=errors,
                measured_us=percentiles(histogram),
                truth_us=truth,
                held_us=held,
                stalls=stalls,
                slow_share=share_above(histogram, STALL_S / 2 * 1_000_000) if stalls else 0.0,
                true_slow_share=true_slow,
            )
        )
    return rows


# -- the table ---------------------------------------------------------------------------


def _us(value: float) -> str:
    if abs(value) >= 10_000:
        return f"{value / 1000:,.0f} ms"
    if abs(value) >= 1000:
        return f"{value / 1000:,.2f} ms"
    return f"{value:,.0f} µs"


def _signed(value: float) -> str:
    return ("+" if value >= 0 else "−") + _us(abs(value))


def floors(rows: Sequence[Measurement]) -> dict[str, Measurement]:
    """Per model, the 0 ms case: the generator's floor."""
    return {r.model: r for r in rows if r.case == FLOOR_CASE}


def table(rows: Sequence[Measurement]) -> str:
    floor = floors(rows)
    lines = [
        "| case | model | samples | p50 | p99 | p99.9 | error p50 | error p99 | error p99.9 "
        "| above floor p50 | above floor p99 | server's own overshoot p50 / p99 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = floor.get(r.model)
        above = ["–", "–"]
        if base is not None and r.case not in (FLOOR_CASE, STALL):
            above = [_signed(r.error_us(p) - base.error_us(p)) for p in (50.0, 99.0)]
        cells = [
            r.case if r.case != STALL else f"stall ({r.stalls} × {STALL_S:g} s)",
            r.model,
            f"{r.samples:,}" + (f" ({r.errors:,} failed)" if r.errors else ""),
            *(_us(r.measured_us[p]) for p in PERCENTILES),
            *(_signed(r.error_us(p)) for p in PERCENTILES),
            *above,
            " / ".join(_signed(r.held_us[p] - r.truth_us[p]) for p in (50.0, 99.0))
            if r.case != STALL
            else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(rows: Sequence[Measurement]) -> list[str]:
    """The targets, each said plainly, met or not."""
    said: list[str] = []
    floor = floors(rows)
    for model, zero in floor.items():
        said.append(
            f"floor ({model}): the generator adds {_us(zero.error_us(50.0))} at p50, "
            f"{_us(zero.error_us(99.0))} at p99, {_us(zero.error_us(99.9))} at p99.9"
        )
    for r in rows:
        base = floor.get(r.model)
        if r.case in (FLOOR_CASE, STALL) or base is None or r.model == "open, service time":
            continue
        above = {p: r.error_us(p) - base.error_us(p) for p in (50.0, 99.0)}
        met = all(abs(v) <= ABOVE_FLOOR_LIMIT_US for v in above.values())
        said.append(
            f"{r.case}, {r.model}: error above the floor {_signed(above[50.0])} at p50, "
            f"{_signed(above[99.0])} at p99 — target ≤ {ABOVE_FLOOR_LIMIT_US} µs "
            + ("met" if met else "NOT met")
        )
    for r in rows:
        if r.case != STALL:
            continue
        truth = r.truth_us[99.9]
        if not truth:
            said.append(f"stall, {r.model}: no stall fell in the measured window (too short)")
            continue
        off = r.measured_us[99.9] / truth - 1
        if r.model == "open":
            met = abs(off) <= STALL_TOLERANCE
            said.append(
                f"stall, open model from intended start: p99.9 {_us(r.measured_us[99.9])} against "
                f"a truth of {_us(truth)} ({off:+.1%}) — target within "
                f"{STALL_TOLERANCE:.0%} " + ("met" if met else "NOT met")
            )
        else:
            said.append(
                f"stall, {r.model}: "
                + "; ".join(
                    f"p{p:g} {_us(r.measured_us[p])} against a truth of {_us(r.truth_us[p])} "
                    f"({r.measured_us[p] / r.truth_us[p] - 1:+.0%})"
                    for p in (99.0, 99.9)
                    if r.truth_us[p]
                )
            )
        if r.true_slow_share:
            ratio = r.slow_share / r.true_slow_share
            said.append(
                f"stall, {r.model}: {r.slow_share:.2%} of the requests measured waited more "
                f"than half the stall ({_us(STALL_S / 2 * 1e6)}); in truth {r.true_slow_share:.2%} "
                f"of arrivals do ({ratio:.2f}× the truth)"
            )
    return said


def write(settings: Settings, rows: Sequence[Measurement], command: str) -> Path:
    folder = settings.folder
    folder.mkdir(parents=True, exist_ok=True)
    text = (
        f"# mailbench calibrate {settings.run_id}\n\n`{command}`\n\n{table(rows)}\n\n"
        + "\n".join(f"- {line}" for line in verdicts(rows))
        + "\n"
    )
    (folder / "calibration.md").write_text(text)
    payload = {
        "run_id": settings.run_id,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        "rows": [
            {**asdict(r), **{f"{k}": {str(p): v for p, v in getattr(r, k).items()}
                             for k in ("measured_us", "truth_us", "held_us")}}
            for r in rows
        ],
    }  # fmt: skip
    (folder / "calibration.json").write_text(json.dumps(payload, indent=1) + "\n")
    return folder / "calibration.md"


# -- the floor of every run --------------------------------------------------------------


def measure_floor(config: RunConfig, children: Children) -> dict[str, Any]:
    """A short sample against the 0 ms case, under ``config``'s own load model (users or
    rate, Locust processes): the ``generator_floor_us`` of the run's manifest."""
    folder = config.run_dir / "floor"
    server = CalibrationServer(children, folder, stall_every_s=3600.0)
    try:
        locust, _ = drive_case(
            children, config, server, FLOOR_CASE, "floor", folder, FLOOR_SAMPLE_S, FLOOR_WARMUP_S
        )
    finally:
        children.stop(server.child)
    histogram = decode(locust.get("histograms", {}).get("form", ""))
    if not histogram.get_total_count():
        raise ProcessFailed(f"the generator's floor sample measured nothing; see {folder}")
    return {
        "p50": int(histogram.get_value_at_percentile(50.0)),
        "p99": int(histogram.get_value_at_percentile(99.0)),
        "samples": int(histogram.get_total_count()),
        "seconds": FLOOR_SAMPLE_S - FLOOR_WARMUP_S,
        "load_model": config.load_model,
    }


# -- command line ------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", choices=MODELS, help="closed (users) or open (rate) model (default: both)"
    )
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="seconds of load per case (default: 10)"
    )
    parser.add_argument("--users", type=int, default=20, help="closed model (default: 20)")
    parser.add_argument(
        "--rate", type=float, default=200.0, help="open model, visits per second (default: 200)"
    )
    parser.add_argument(
        "--stall-every",
        type=float,
        default=20.0,
        metavar="S",
        help=f"one {STALL_S:g} s stall every S seconds in the stall case, the first at S/2; "
        "the stall case runs at least S seconds (default: 20)",
    )
    parser.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated (default: {','.join(CASES)})"
    )
    parser.add_argument("--out", type=Path, default=Path("results"), help="results root folder")


def settings_from_args(args: argparse.Namespace) -> Settings:
    cases = tuple(c.strip() for c in args.cases.split(",") if c.strip())
    if not cases or any(c not in CASES for c in cases):
        raise ConfigError(f"--cases {args.cases!r}: choose from {', '.join(CASES)}")
    return Settings(
        models=(args.model,) if args.model else MODELS,
        seconds=args.seconds,
        warmup_s=min(1.0, args.seconds / 4),
        users=args.users,
        rate=args.rate,
        stall_every_s=args.stall_every,
        cases=cases,
        out=args.out,
    )


def cli_main(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    base = RunConfig(
        users=settings.users,
        spawn_rate=settings.users,
        out=settings.out,
        run_id=f"calibration-{settings.run_id}",
    )
    with Children() as children:
        rows = measure(settings, children, base)
    command = "mailbench calibrate " + " ".join(sys.argv[2:])
    path = write(settings, rows, command.strip())
    print(f"\n{table(rows)}\n\n" + "\n".join(f"- {line}" for line in verdicts(rows)))
    print(f"\nresults in {path.parent}/ (calibration.md, calibration.json)", flush=True)
    return 0
