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
* the **stall** is held against what a visitor arriving at a random moment waits
  (:mod:`harness.results.calibration`). An open model timed from each visit's intended
  start (``form_intended``) should find it (within 5% at p99.9); a closed model, whose
  few users each wait out a stall once instead of arriving all along, under-reports it.

Each case's load is short and bounded (``--seconds``, default 10 s, the first second a
warm-up left out of the figures, as ``mailbench run`` leaves out its own; the stall case
at least one stall period). The table (:mod:`harness.report.calibration`) goes to the
console and, with the figures as JSON, to ``<out>/calibration-<id>/``.

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

from harness.errors import ConfigError, ProcessFailed
from harness.process import Child, Children, answered_identity, wait_ready
from harness.report.calibration import table, verdicts
from harness.results.calibration import (
    CASES,
    FIXED_CASES,
    FLOOR_CASE,
    PERCENTILES,
    STALL,
    STALL_S,
    Measurement,
    percentiles,
    share_above,
    stall_share_waiting,
    stall_truth_us,
)
from harness.results.collect import read_locust
from harness.run.config import RunConfig
from harness.run.locust import LocustRun
from harness.run.target import Target
from harness.run.tiers import Tiers
from servers.metrics import decode

MODELS = ("closed", "open")
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
