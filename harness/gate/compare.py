"""``mailbench compare``: the CI gate that neither misses a slower send path nor cries wolf.

Shared CI machines swing by tens of percent between two runs of the same code, so a
figure is called a regression only when **both** hold:

* it changed by at least ``--min-change`` (10%): the pooled figure of the current runs
  against that of the baseline runs (HdrHistograms merged, never percentiles averaged);
* the change is significant: a one-sided Mann–Whitney U test over the per-second samples
  of ``timeseries.csv`` gives p < ``--alpha``. The warm-up seconds a run's manifest
  records (``config.warmup_s``; 1 s for folders without it) are left out, or the first
  ``--warmup`` seconds when given.

Which figure is judged by which rule depends on what the send time is made of:

* **queued modes**: POST /send is server work plus one broker round trip, which scales
  with the machine as the form page does; the machine-independent figure is the gap,
  ``send p50 / form p50`` of the same second;
* **direct, blocking**: POST /send waits for the API, whose latency the fake's model
  sets, so ``send p50`` itself is machine-independent there, while the gap moves with
  every change of the form page and is only shown;
* **absolute percentiles** (the other send p50/p99) are flagged only beyond the wider
  ``--abs-band`` (50%), significant, and when the form page (the control, served by the
  same process) did not slow down by the min change too: then the machine was busier;
* a current run whose accounting is not sound (:attr:`Accounting.sound`: an email
  ``lost`` or ``unexpected``, or most requests failed) always fails, as does a share of
  failed requests more than one percentage point above the baseline's; ``duplicates``
  are shown, never judged.

With fewer than ``--min-samples`` seconds on either side no test is possible: the row
says "insufficient data" with the pooled change, and does not fail.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from scipy.stats import mannwhitneyu

from harness.errors import ConfigError, ResultsError
from harness.results.accounting import Accounting
from harness.results.folder import Run, load_run
from servers.metrics import merge
from servers.modes import MODES

REGRESSION, OK, FASTER, INSUFFICIENT, INFO, MISSING = (
    "regression",
    "ok",
    "faster",
    "insufficient data",
    "info",
    "missing",
)
MAX_ERROR_INCREASE = 0.01  # share of failed requests, in absolute terms
Samples = tuple[list[float], list[float]]  # (baseline, current)
Pair = tuple[float | None, float | None]
PERCENTILES = (50.0, 99.0)


@dataclass(frozen=True, slots=True)
class GateSettings:
    min_change: float = 0.10
    alpha: float = 0.01
    abs_band: float = 0.50
    min_samples: int = 5
    warmup_s: float | None = None  # None: the warm-up each run's manifest records

    def __post_init__(self) -> None:
        if not (self.min_change >= 0 and 0 < self.alpha < 1 and self.abs_band >= 0):
            raise ConfigError("--min-change and --abs-band must be ≥ 0, --alpha in (0, 1).")
        if self.min_samples < 2 or (self.warmup_s is not None and self.warmup_s < 0):
            raise ConfigError("--min-samples must be at least 2 and --warmup at least 0.")


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table: a figure of one mode, before and after, and the verdict."""

    mode: str
    metric: str
    unit: str
    rule: str  # "min-change", "abs-band", "must be 0", "errors", "info"
    baseline: float | None
    current: float | None
    change: float | None = None  # current / baseline − 1
    p_value: float | None = None
    n_baseline: int = 0  # per-second samples
    n_current: int = 0
    spread: float | None = None  # half the IQR of the current per-second samples
    verdict: str = INFO
    note: str = ""


@dataclass(slots=True)
class Comparison:
    baseline: list[Path]
    current: list[Path]
    settings: GateSettings
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[Row]:
        return [row for row in self.rows if row.verdict == REGRESSION]

    @property
    def exit_code(self) -> int:
        return 1 if self.regressions else 0

    def markdown(self) -> str:
        s = self.settings
        result = f"**FAIL**, {len(self.regressions)} regression(s)" if self.regressions else "pass"
        lines = [
            f"### mailbench compare: {result}",
            "",
            f"A regression needs a change of at least {s.min_change:.0%} and p < {s.alpha:g} "
            "(one-sided Mann–Whitney U over per-second samples); absolute percentiles only "
            f"beyond {s.abs_band:.0%}. Baseline {_names(self.baseline)}, "
            f"current {_names(self.current)}.",
            "",
            "| metric | baseline | current | change | verdict |",
            "|---|---:|---:|---:|---|",
            *(
                f"| {r.mode} {r.metric} | {_value(r.baseline, r.unit)} | "
                f"{_value(r.current, r.unit)} | {_change(r.change)} | {_verdict(r)} |"
                for r in self.rows
            ),
        ]
        lines += ["", *(f"- {note}" for note in self.notes)] if self.notes else []
        return "\n".join(lines) + "\n"

    def as_json(self) -> dict[str, Any]:
        return {
            "result": "fail" if self.regressions else "pass",
            "regressions": len(self.regressions),
            "settings": asdict(self.settings),
            "baseline": [str(p) for p in self.baseline],
            "current": [str(p) for p in self.current],
            "rows": [asdict(row) for row in self.rows],
            "notes": list(self.notes),
        }


# -- reading the results folders --------------------------------------------------------


def pooled(runs: Sequence[Run], mode: str, metric: str) -> dict[float, float | None]:
    """p50 and p99 over every request of every run: merged histograms when all runs have
    them, else (older or hand-made folders) the summary rows weighted by count."""
    if all((mode, metric) in run.histograms for run in runs):
        total = merge(run.histograms[(mode, metric)] for run in runs)
        if not total.get_total_count():
            return dict.fromkeys(PERCENTILES)
        found = total.get_percentile_to_value_dict(list(PERCENTILES))
        return {p: float(found[p]) for p in PERCENTILES}
    rows = [row for run in runs if (row := run.row(mode, metric)) and row.count > 0]
    weight = sum(row.count for row in rows)
    return {
        p: sum(r.us_at(p) * r.count for r in rows) / weight if weight else None for p in PERCENTILES
    }


OLD_WARMUP_S = 1.0  # what the gate left out before runs recorded their warm-up


def warmup_of(run: Run, warmup: float | None = None) -> float:
    """The seconds of ``run``'s timeline to leave out: ``warmup`` when given, else the
    warm-up its manifest records."""
    if warmup is not None:
        return warmup
    recorded = run.manifest.get("config", {}).get("warmup_s")
    return float(recorded) if recorded is not None else OLD_WARMUP_S


def series(
    run: Run, mode: str, metric: str, percentile: float, warmup: float | None = None
) -> dict[int, float]:
    """Second → that second's percentile (50 or 99). Seconds without requests (sends are
    sparse at low rates) and the warm-up (:func:`warmup_of`; a second it ends in
    included) are left out."""
    first = math.ceil(warmup_of(run, warmup))
    return {
        r.second: float(value)
        for r in run.timeseries
        if r.mode == mode
        and r.metric == metric
        and r.second >= first
        and (r.requests or 0) > 0
        and (value := r.us_at(percentile)) is not None
    }


def per_second(
    runs: Sequence[Run], mode: str, metric: str, percentile: float, warmup: float | None
) -> list[float]:
    return [v for run in runs for v in series(run, mode, metric, percentile, warmup).values()]


def per_second_gap(runs: Sequence[Run], mode: str, warmup: float | None) -> list[float]:
    """``send p50 / form p50`` of the same second, for every second that has both."""
    gaps: list[float] = []
    for run in runs:
        send = series(run, mode, "send", 50.0, warmup)
        form = series(run, mode, "form", 50.0, warmup)
        gaps += [value / form[t] for t, value in send.items() if form.get(t)]
    return gaps


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# -- the rules --------------------------------------------------------------------------


def judge(row: Row, samples: Samples, settings: GateSettings, control: float | None = None) -> Row:
    """Apply the row's rule ("min-change", "abs-band" or "info") to its figure;
    ``control`` is the change of the form page, which excuses an absolute figure."""
    base, cur = samples
    change = row.current / row.baseline - 1 if row.baseline and row.current is not None else None
    row = replace(row, change=change, n_baseline=len(base), n_current=len(cur))
    row = replace(row, spread=_half_iqr(cur))
    if row.rule == "info" or change is None:
        return row
    threshold = settings.min_change if row.rule == "min-change" else settings.abs_band
    if min(len(base), len(cur)) < settings.min_samples:
        big = "; the pooled change is above the threshold" if abs(change) >= threshold else ""
        return replace(row, verdict=INSUFFICIENT, note=f"under {settings.min_samples} s{big}")
    direction = "greater" if change > 0 else "less"
    p = float(mannwhitneyu(cur, base, alternative=direction).pvalue)
    row = replace(row, verdict=OK, p_value=p)
    if abs(change) < threshold or p >= settings.alpha:
        return row
    if change < 0:
        return replace(row, verdict=FASTER)
    if control is not None and control >= settings.min_change:
        return replace(row, note=f"form page {control:+.0%} too: a busier machine")
    return replace(row, verdict=REGRESSION)


def _half_iqr(samples: Sequence[float]) -> float | None:
    if len(samples) < 4:
        return None
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return (q3 - q1) / 2


def compare_runs(
    baseline: Sequence[Run], current: Sequence[Run], settings: GateSettings | None = None
) -> Comparison:
    settings = settings or GateSettings()
    comparison = Comparison([r.path for r in baseline], [r.path for r in current], settings)
    comparison.notes += _config_differences(baseline, current)
    for mode in dict.fromkeys(m for run in [*baseline, *current] for m in run.modes):
        in_base = any(mode in run.modes for run in baseline)
        in_cur = any(mode in run.modes for run in current)
        if in_base and in_cur:
            comparison.rows += _mode_rows(mode, baseline, current, settings)
        else:
            note = f"not in the {'current' if in_base else 'baseline'} runs"
            comparison.rows.append(
                Row(mode, "mode", "", "info", None, None, None, verdict=MISSING, note=note)
            )
        comparison.rows += _accounting_rows(mode, baseline, current)
    return comparison


def _mode_rows(
    mode: str, baseline: Sequence[Run], current: Sequence[Run], settings: GateSettings
) -> list[Row]:
    w = settings.warmup_s

    def both(metric: str) -> dict[float, Pair]:
        base, cur = pooled(baseline, mode, metric), pooled(current, mode, metric)
        return {p: (base[p], cur[p]) for p in PERCENTILES}

    def seconds(metric: str, percentile: float) -> Samples:
        return per_second(baseline, mode, metric, percentile, w), per_second(
            current, mode, metric, percentile, w
        )

    known = MODES.get(mode)  # a --target's server is judged as a queued one
    api_bound = known is not None and not known.queued  # POST /send awaits the API
    send, form = both("send"), both("form")
    gap = _ratio(send[50.0][0], form[50.0][0]), _ratio(send[50.0][1], form[50.0][1])
    gap_rule = "info" if api_bound else "min-change"
    gap_samples = per_second_gap(baseline, mode, w), per_second_gap(current, mode, w)
    rows = [judge(Row(mode, "gap (send/form p50)", "×", gap_rule, *gap), gap_samples, settings)]
    for pct in PERCENTILES:
        rule = "min-change" if api_bound and pct == 50.0 else "abs-band"
        form_ratio = _ratio(form[pct][1], form[pct][0])
        control = form_ratio - 1 if rule == "abs-band" and form_ratio is not None else None
        row = Row(mode, f"send p{pct:.0f}", "µs", rule, *send[pct])
        rows.append(judge(row, seconds("send", pct), settings, control))
    rows.append(
        judge(Row(mode, "form p50", "µs", "info", *form[50.0]), seconds("form", 50.0), settings)
    )
    rows.append(_errors_row(mode, baseline, current))
    return rows


def _errors_row(mode: str, baseline: Sequence[Run], current: Sequence[Run]) -> Row:
    def share(runs: Sequence[Run]) -> float | None:
        rows = [r for run in runs for m in ("form", "send") if (r := run.row(mode, m))]
        failed, done = sum(r.errors for r in rows), sum(r.count for r in rows)
        return failed / (done + failed) if done + failed else None

    base, cur = share(baseline), share(current)
    bad = cur is not None and cur - (base or 0.0) > MAX_ERROR_INCREASE
    # A current run that mostly failed is not sound, however the baseline did.
    counts = _pooled_accounting(current, mode)
    failures = counts.failures if counts is not None else None
    note = f"accounting {counts.verdict}: {failures}" if counts is not None and failures else ""
    verdict = REGRESSION if bad or failures else OK
    return Row(mode, "failed requests", "%", "errors", base, cur, verdict=verdict, note=note)


def _accounting_rows(mode: str, baseline: Sequence[Run], current: Sequence[Run]) -> list[Row]:
    """``lost``, ``unexpected`` and ``duplicates`` over each side's runs. Current runs
    whose accounting is not sound fail, on the rows that make it so; the accounting's
    verdict (``FAILED``, ``duplicates``) is noted on each row that counts towards it."""
    base, cur = (_pooled_accounting(runs, mode) for runs in (baseline, current))
    if base is None and cur is None:
        return []
    rows = []
    for column in ("lost", "unexpected", "duplicates"):
        b, c = (None if side is None else side.as_row()[column] for side in (base, cur))
        rule = "info" if column == "duplicates" else "must be 0"
        if cur is None or rule == "info":
            verdict = MISSING if cur is None else INFO
        else:
            verdict = OK if cur.sound or not c else REGRESSION
        notes = [f"accounting {cur.verdict}"] if cur is not None and c else []
        notes += [f"the baseline has {b} too"] if b else []
        rows.append(Row(mode, column, "emails", rule, b, c, verdict=verdict, note="; ".join(notes)))
    return rows


def _pooled_accounting(runs: Sequence[Run], mode: str) -> Accounting | None:
    found = [counts for run in runs if (counts := run.accounting_of(mode)) is not None]
    return sum(found[1:], found[0]) if found else None


def _config_differences(baseline: Sequence[Run], current: Sequence[Run]) -> list[str]:
    def values(runs: Sequence[Run], key: str) -> str:
        return "/".join(sorted({str(run.manifest.get("config", {}).get(key)) for run in runs}))

    keys = ("scenario", "users", "duration_s", "latency", "seed", "send_delay_ms")
    return [
        f"configs differ: {key} {b} (baseline) vs {c} (current)"
        for key in keys
        if (b := values(baseline, key)) != (c := values(current, key))
    ]


# -- formatting -------------------------------------------------------------------------


def _names(paths: Sequence[Path]) -> str:
    def name(path: Path) -> str:
        return str(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path)

    return ", ".join(f"`{name(p)}`" for p in paths)


def _value(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    if unit == "µs":
        return f"{value / 1000:,.2f} ms" if value >= 1000 else f"{value:,.0f} µs"
    formats = {"%": f"{value:.2%}", "×": f"{value:,.2f}×"}
    return formats.get(unit, f"{value:,.0f}")


def _change(change: float | None) -> str:
    return "–" if change is None else f"{change:+.1%}"


def _verdict(row: Row) -> str:
    details = [f"p={row.p_value:.2g}"] if row.p_value is not None else []
    if row.n_baseline or row.n_current:
        details.append(f"n={row.n_baseline}/{row.n_current} s")
    if row.rule in ("min-change", "abs-band"):
        details.append(row.rule)
    details += [row.note] if row.note else []
    text = f"**{row.verdict.upper()}**" if row.verdict == REGRESSION else row.verdict
    return text + (f" ({'; '.join(details)})" if details else "")


# -- command line -----------------------------------------------------------------------


def load_runs(paths: Iterable[Path]) -> list[Run]:
    runs = []
    for path in paths:
        try:
            runs.append(load_run(path))
        except ResultsError as exc:
            hint = f" (did you mean {path / 'latest'}?)" if (path / "latest").exists() else ""
            raise ResultsError(f"{exc}{hint}") from exc
    return runs


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dirs",
        nargs="*",
        metavar="DIR",
        help="BASELINE_DIR RUN_DIR, each maybe a comma list; with --baseline (--current) "
        "alone, the current (baseline) folders",
    )
    parser.add_argument("--baseline", action="append", default=[], help="baseline run folder(s)")
    parser.add_argument("--current", action="append", default=[], help="current run folder(s)")
    parser.add_argument("--min-change", type=float, default=0.10, help="default 0.10 (10%%)")
    parser.add_argument("--alpha", type=float, default=0.01, help="significance, default 0.01")
    parser.add_argument("--abs-band", type=float, default=0.50, help="absolute figures, 0.50")
    parser.add_argument("--min-samples", type=int, default=5, help="seconds per side, 5")
    parser.add_argument(
        "--warmup",
        type=float,
        help="first seconds of each run's timeline left out (default: the warm-up its "
        f"manifest records; {OLD_WARMUP_S:g} for folders without one)",
    )
    parser.add_argument("--json", type=Path, help="also write the comparison here as JSON")


def sides(args: argparse.Namespace) -> tuple[list[Path], list[Path]]:
    """The baseline and current folders from positionals and options (comma lists too)."""

    def split(values: Iterable[str]) -> list[Path]:
        return [Path(p.strip()) for v in values for p in v.split(",") if p.strip()]

    given, base, cur = args.dirs, split(args.baseline), split(args.current)
    if base and cur and given:
        raise ConfigError("give the folders either as BASELINE_DIR RUN_DIR or with options.")
    if base or cur:
        base, cur = base or split(given), cur or split(given)
    elif len(given) == 2:
        base, cur = split(given[:1]), split(given[1:])
    else:
        raise ConfigError("compare needs two folders: BASELINE_DIR RUN_DIR.")
    if not base or not cur:
        raise ConfigError("compare needs at least one baseline and one current results folder.")
    return base, cur


def cli_main(args: argparse.Namespace) -> int:
    base, cur = sides(args)
    settings = GateSettings(
        args.min_change, args.alpha, args.abs_band, args.min_samples, args.warmup
    )
    comparison = compare_runs(load_runs(base), load_runs(cur), settings)
    sys.stdout.write(comparison.markdown())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(comparison.as_json(), indent=2) + "\n")
    return comparison.exit_code
