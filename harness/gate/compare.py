"""``mailbench compare``: the CI gate, deciding on runs, not on the seconds of one run.

Two runs of the same code differ by more than the seconds inside one run do, so the
seconds of a run are not independent draws and a test over them cries wolf. The gate
takes **the run as the unit**: each run gives one figure per mode (its p50 or p99 from
its own HdrHistogram, the warm-up left out), and a figure is called a regression only
when both hold:

* it changed by at least ``--min-change`` (5%): the geometric mean of the current runs'
  figures over that of the baseline runs (with ``--paired``, the geometric mean of the
  rounds' ratios, which is the same number);
* the change is significant across runs: a one-sided t-test on the runs' log figures —
  paired by round with ``--paired`` (round k of the baseline ran beside, or next to,
  round k of the current side), else Welch's — and its p-value, **Holm-adjusted over every
  figure tested in the comparison** (all modes, all metrics), is below ``--alpha``
  (0.01): the chance that unchanged code fails the gate, per gate run, not per figure.

With fewer than ``--min-runs`` (3) runs a side there is no between-run spread to test
against: a figure then counts as a regression only beyond ``--abs-band`` (50%).

Which figure is judged by which rule depends on what it is made of:

* **queued modes**: the gap, ``send p50 / form p50`` of the same run: server work plus
  a broker round trip over the form page, which scales with the machine as POST /send
  does, so it holds still when the machine is busier;
* **direct, blocking**: POST /send waits for the API, whose latency the fake's model
  sets, so ``send p50`` itself is judged; the gap moves with the form page and is shown;
* **the form page** is judged too when the two sides ran at the same time
  (``--schedule concurrent``): then both saw the same machine; one after the other
  (``sequential``, the default for folders measured apart) it is the control;
* **send p99** is judged beyond ``--abs-band``; in sequential runs, not when the form
  page slowed down by the min change too: that is a busier machine; a queued mode's
  send p50 is its gap times its form page, both judged, and is only shown;
* a current run whose accounting is not sound (:attr:`Accounting.sound`: an email
  ``lost`` or ``unexpected``, or most requests failed) fails, as does a share of failed
  requests more than one percentage point above the baseline's; ``duplicates`` are shown.

Blind spots are failures: a mode of the baseline absent from a current run, or a mode
without accounting on the current side, fails (``missing``). Folders without histograms
are refused: percentiles cannot be averaged. ``docs/gate.md`` has the false-alarm and
detection rates of these rules, measured.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from scipy.stats import ttest_1samp, ttest_ind

from harness.errors import ConfigError, ResultsError
from harness.results.accounting import Accounting
from harness.results.folder import Run, load_run
from servers.modes import MODES

REGRESSION, OK, FASTER, INFO, MISSING, NEW = (
    "regression",
    "ok",
    "faster",
    "info",
    "missing",
    "new",
)
FAILING = (REGRESSION, MISSING)
MAX_ERROR_INCREASE = 0.01  # share of failed requests, in absolute terms
SCHEDULES = ("sequential", "concurrent")
GAP = "gap (send/form p50)"


@dataclass(frozen=True, slots=True)
class GateSettings:
    min_change: float = 0.05
    alpha: float = 0.01  # family-wise: per gate run, over every figure tested
    abs_band: float = 0.50
    min_runs: int = 3  # runs a side for a test across runs
    paired: bool = False  # baseline run k and current run k are a pair (one round)
    schedule: str = "sequential"  # how the two sides' runs were measured

    def __post_init__(self) -> None:
        if not (self.min_change >= 0 and 0 < self.alpha < 1 and self.abs_band >= 0):
            raise ConfigError("--min-change and --abs-band must be ≥ 0, --alpha in (0, 1).")
        if self.min_runs < 2:
            raise ConfigError("--min-runs must be at least 2: one run has no spread.")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule is one of {', '.join(SCHEDULES)}.")


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table: a figure of one mode, before and after, and the verdict."""

    mode: str
    metric: str
    unit: str
    rule: str  # "min-change", "abs-band", "must be 0", "errors", "info"
    baseline: float | None  # the geometric mean of the runs' figures (counts: the sum)
    current: float | None
    change: float | None = None  # current / baseline − 1
    p_value: float | None = None  # one-sided, across runs, before the Holm adjustment
    p_holm: float | None = None  # Holm-adjusted over every figure tested
    n_baseline: int = 0  # runs with this figure
    n_current: int = 0
    spread: float | None = None  # between-run SD of the current runs' log figure
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
        """The rows that fail the gate: regressions, and figures missing on the current side."""
        return [row for row in self.rows if row.verdict in FAILING]

    @property
    def tested(self) -> int:
        return sum(row.p_value is not None for row in self.rows)

    @property
    def exit_code(self) -> int:
        return 1 if self.regressions else 0

    def markdown(self) -> str:
        s = self.settings
        result = f"**FAIL**, {len(self.regressions)} regression(s)" if self.regressions else "pass"
        test = "paired by round" if s.paired else "Welch"
        runs = f"{len(self.baseline)} baseline and {len(self.current)} current runs ({s.schedule})"
        lines = [
            f"### mailbench compare: {result}",
            "",
            f"{runs}. A regression needs a change of at least {s.min_change:.0%} and a "
            f"Holm-adjusted p < {s.alpha:g} over the {self.tested} figures tested (one-sided "
            f"t-test across runs, {test}); send p99 only beyond {s.abs_band:.0%}, as every "
            f"figure with under {s.min_runs} runs a side. "
            f"Baseline {_names(self.baseline)}, current {_names(self.current)}.",
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
            "tested": self.tested,
            "settings": asdict(self.settings),
            "baseline": [str(p) for p in self.baseline],
            "current": [str(p) for p in self.current],
            "rows": [asdict(row) for row in self.rows],
            "notes": list(self.notes),
        }


# -- one figure per run -----------------------------------------------------------------

Figure = Callable[[Run], float | None]


def percentile(mode: str, metric: str, pct: float) -> Figure:
    """The run's ``pct`` percentile of ``metric`` from its histogram (None: no requests)."""

    def of(run: Run) -> float | None:
        histogram = run.histograms.get((mode, metric))
        if histogram is None:
            raise ResultsError(
                f"{run.path} has no histogram of {mode} {metric}: the gate compares "
                "histograms and never averages percentiles; measure it again with "
                "`mailbench run`."
            )
        if not histogram.get_total_count():
            return None
        return float(histogram.get_value_at_percentile(pct))

    return of


def gap(mode: str) -> Figure:
    """``send p50 / form p50`` of the run."""
    send, form = percentile(mode, "send", 50.0), percentile(mode, "form", 50.0)

    def of(run: Run) -> float | None:
        s, f = send(run), form(run)
        return s / f if s is not None and f else None

    return of


# -- the test across runs ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Across:
    """A figure on both sides, as logs: the change and its one-sided p-values."""

    baseline: float | None
    current: float | None
    change: float | None
    p_greater: float | None
    p_less: float | None
    n_baseline: int
    n_current: int
    spread: float | None


def across_runs(
    base: Sequence[float | None], cur: Sequence[float | None], settings: GateSettings
) -> Across:
    """The change of a figure from the baseline runs to the current runs, and how
    surprising it is given how much the runs of each side differ."""
    if settings.paired:
        pairs = [(b, c) for b, c in zip(base, cur, strict=True) if b and c]
        lb, lc = [math.log(b) for b, _ in pairs], [math.log(c) for _, c in pairs]
    else:
        lb, lc = [math.log(b) for b in base if b], [math.log(c) for c in cur if c]
    if not lb or not lc:
        geo_b = math.exp(statistics.fmean(lb)) if lb else None
        geo_c = math.exp(statistics.fmean(lc)) if lc else None
        return Across(geo_b, geo_c, None, None, None, len(lb), len(lc), None)
    shift = statistics.fmean(lc) - statistics.fmean(lb)
    p_greater = p_less = None
    if min(len(lb), len(lc)) >= settings.min_runs:
        p_greater, p_less = _one_sided(lb, lc, settings.paired)
    spread = statistics.stdev(lc) if len(lc) > 1 else None
    return Across(
        math.exp(statistics.fmean(lb)),
        math.exp(statistics.fmean(lc)),
        math.expm1(shift),
        p_greater,
        p_less,
        len(lb),
        len(lc),
        spread,
    )


def _one_sided(lb: Sequence[float], lc: Sequence[float], paired: bool) -> tuple[float, float]:
    """p of "the current side is slower" and of "it is faster" (the two add up to 1)."""
    if paired:
        d = [c - b for b, c in zip(lb, lc, strict=True)]
        if max(d) == min(d):  # no spread at all: a constant shift, or none
            return (0.0, 1.0) if d[0] > 0 else (1.0, 0.0) if d[0] < 0 else (1.0, 1.0)
        p = float(ttest_1samp(d, 0.0, alternative="greater").pvalue)
    elif max(lb) == min(lb) and max(lc) == min(lc):
        shift = lc[0] - lb[0]
        return (0.0, 1.0) if shift > 0 else (1.0, 0.0) if shift < 0 else (1.0, 1.0)
    else:
        p = float(ttest_ind(lc, lb, equal_var=False, alternative="greater").pvalue)
    return p, 1.0 - p


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment: reject where the adjusted p is below alpha, and the
    chance of any false rejection among them all stays below alpha."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [1.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


# -- the rules --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Judged:
    """A row waiting for its verdict, which needs every other row's p-value (Holm)."""

    row: Row
    across: Across
    control: float | None = None  # the form page's change, which may excuse the row


def measured(
    mode: str,
    metric: str,
    unit: str,
    rule: str,
    figure: Figure,
    baseline: Sequence[Run],
    current: Sequence[Run],
    settings: GateSettings,
) -> Judged:
    across = across_runs([figure(r) for r in baseline], [figure(r) for r in current], settings)
    row = Row(
        mode,
        metric,
        unit,
        rule,
        across.baseline,
        across.current,
        across.change,
        across.p_greater if rule != "info" else None,
        n_baseline=across.n_baseline,
        n_current=across.n_current,
        spread=across.spread,
    )
    return Judged(row, across)


def decide(judged: Sequence[Judged], settings: GateSettings) -> list[Row]:
    """The verdicts: Holm over every tested row, then each row's rule."""
    tested = [j for j in judged if j.row.p_value is not None]
    adjusted = dict(zip(map(id, tested), holm([j.row.p_value or 1.0 for j in tested]), strict=True))
    return [_verdict_of(j, adjusted.get(id(j)), settings) for j in judged]


def _verdict_of(judged: Judged, p_holm: float | None, settings: GateSettings) -> Row:
    row, change = replace(judged.row, p_holm=p_holm), judged.row.change
    if row.rule == "info" or change is None:
        return row
    threshold = settings.min_change if row.rule == "min-change" else settings.abs_band
    if p_holm is None:  # too few runs for a test: only a change beyond the band counts
        band = settings.abs_band
        note = f"under {settings.min_runs} runs a side: no test, only a change ≥ {band:.0%}"
        slower = change >= max(threshold, settings.abs_band)
        faster = change <= -max(threshold, settings.abs_band)
        return replace(row, verdict=REGRESSION if slower else FASTER if faster else OK, note=note)
    if change <= -threshold and (judged.across.p_less or 1.0) < settings.alpha:
        return replace(row, verdict=FASTER)
    if change < threshold:
        return replace(row, verdict=OK)
    if p_holm >= settings.alpha:
        runs = min(row.n_baseline, row.n_current)
        return replace(row, verdict=OK, note=f"not significant over {runs} runs a side")
    if judged.control is not None and judged.control >= settings.min_change:
        return replace(
            row, verdict=OK, note=f"form page {judged.control:+.0%} too: a busier machine"
        )
    return replace(row, verdict=REGRESSION)


def compare_runs(
    baseline: Sequence[Run], current: Sequence[Run], settings: GateSettings | None = None
) -> Comparison:
    settings = settings or GateSettings()
    if settings.paired and len(baseline) != len(current):
        raise ConfigError(
            f"--paired needs as many baseline runs as current runs ({len(baseline)} vs "
            f"{len(current)}): run k of one side pairs with run k of the other."
        )
    comparison = Comparison([r.path for r in baseline], [r.path for r in current], settings)
    comparison.notes += _config_differences(baseline, current)
    judged: list[Judged | Row] = []
    for mode in dict.fromkeys(m for run in [*baseline, *current] for m in run.modes):
        without = [run for run in current if mode not in run.modes]
        if not any(mode in run.modes for run in baseline):
            judged.append(
                Row(
                    mode,
                    "mode",
                    "",
                    "info",
                    None,
                    None,
                    verdict=NEW,
                    note="only in the current runs",
                )
            )
        elif without:
            note = f"not in the current run {_names([without[0].path])}"
            if len(without) > 1:
                note = f"not in {len(without)} of the {len(current)} current runs"
            judged.append(
                Row(mode, "mode", "", "must be 0", None, None, verdict=MISSING, note=note)
            )
        else:
            judged += _mode_rows(mode, list(baseline), list(current), settings)
            judged.append(_errors_row(mode, baseline, current))
        if any(mode in run.modes for run in baseline):
            judged += _accounting_rows(mode, baseline, current)
    decided = iter(decide([j for j in judged if isinstance(j, Judged)], settings))
    comparison.rows = [next(decided) if isinstance(j, Judged) else j for j in judged]
    return comparison


def _mode_rows(
    mode: str, baseline: list[Run], current: list[Run], settings: GateSettings
) -> list[Judged]:
    known = MODES.get(mode)  # a --target's server is judged as a queued one
    api_bound = known is not None and not known.sends_after_reply  # POST /send awaits the API
    concurrent = settings.schedule == "concurrent"

    def row(metric: str, unit: str, rule: str, figure: Figure) -> Judged:
        return measured(mode, metric, unit, rule, figure, baseline, current, settings)

    form_rule = "min-change" if concurrent else "info"
    form = row("form p50", "µs", form_rule, percentile(mode, "form", 50.0))
    # A queued mode's send p50 is its gap times its form page, both judged: only shown.
    rows = [
        row(GAP, "×", "info" if api_bound else "min-change", gap(mode)),
        row(
            "send p50", "µs", "min-change" if api_bound else "info", percentile(mode, "send", 50.0)
        ),
    ]
    tail = row("send p99", "µs", "abs-band", percentile(mode, "send", 99.0))
    if not concurrent:  # the control excuses a busier machine
        tail = replace(tail, control=form.row.change)
    return [*rows, tail, form]


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
    whose accounting is not sound fail, on the rows that make it so, as does a current
    run with no accounting of the mode; the accounting's verdict (``FAILED``,
    ``duplicates``) is noted on each row that counts towards it."""
    base, cur = (_pooled_accounting(runs, mode) for runs in (baseline, current))
    unaccounted = [run for run in current if mode in run.modes and run.accounting_of(mode) is None]
    if base is None and cur is None and not unaccounted:
        return []
    rows = []
    for column in ("lost", "unexpected", "duplicates"):
        b, c = (None if side is None else side.as_row()[column] for side in (base, cur))
        rule = "info" if column == "duplicates" else "must be 0"
        notes = [f"accounting {cur.verdict}"] if cur is not None and c else []
        if unaccounted:
            verdict = MISSING
            notes.append(f"no accounting in {len(unaccounted)} of the {len(current)} current runs")
        elif rule == "info":
            verdict = INFO
        else:
            verdict = OK if cur is None or cur.sound or not c else REGRESSION
        notes += [f"the baseline has {b} too"] if b else []
        rows.append(Row(mode, column, "emails", rule, b, c, verdict=verdict, note="; ".join(notes)))
    return rows


def _pooled_accounting(runs: Sequence[Run], mode: str) -> Accounting | None:
    found = [counts for run in runs if (counts := run.accounting_of(mode)) is not None]
    return sum(found[1:], found[0]) if found else None


def _config_differences(baseline: Sequence[Run], current: Sequence[Run]) -> list[str]:
    def values(runs: Sequence[Run], key: str) -> str:
        return "/".join(sorted({str(run.manifest.get("config", {}).get(key)) for run in runs}))

    keys = (
        "scenario",
        "users",
        "duration_s",
        "latency",
        "seed",
        "send_delay_ms",
        "send_work_us",
        "form_work_us",
    )
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
    details = []
    if row.p_holm is not None:
        details.append(f"p={row.p_holm:.2g} Holm")
    if row.n_baseline or row.n_current:
        details.append(f"{row.n_baseline}/{row.n_current} runs")
    if row.rule in ("min-change", "abs-band"):
        details.append(row.rule)
    details += [row.note] if row.note else []
    text = f"**{row.verdict.upper()}**" if row.verdict in FAILING else row.verdict
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
    defaults = GateSettings()
    parser.add_argument(
        "dirs",
        nargs="*",
        metavar="DIR",
        help="BASELINE_DIR RUN_DIR, each maybe a comma list; with --baseline (--current) "
        "alone, the current (baseline) folders",
    )
    parser.add_argument("--baseline", action="append", default=[], help="baseline run folder(s)")
    parser.add_argument("--current", action="append", default=[], help="current run folder(s)")
    parser.add_argument(
        "--min-change", type=float, default=defaults.min_change, help="default 0.05 (5%%)"
    )
    parser.add_argument(
        "--alpha", type=float, default=defaults.alpha, help="per comparison (Holm), 0.01"
    )
    parser.add_argument(
        "--abs-band", type=float, default=defaults.abs_band, help="other percentiles, 0.50"
    )
    parser.add_argument(
        "--min-runs", type=int, default=defaults.min_runs, help="runs a side for a test, 3"
    )
    parser.add_argument(
        "--paired",
        action="store_true",
        help="baseline run k and current run k were measured together (one round)",
    )
    parser.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=defaults.schedule,
        help="concurrent: both sides ran at the same time, so the form page is judged too "
        "(default: sequential)",
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


def settings_from(args: argparse.Namespace) -> GateSettings:
    return GateSettings(
        min_change=args.min_change,
        alpha=args.alpha,
        abs_band=args.abs_band,
        min_runs=args.min_runs,
        paired=args.paired,
        schedule=args.schedule,
    )


def cli_main(args: argparse.Namespace) -> int:
    base, cur = sides(args)
    comparison = compare_runs(load_runs(base), load_runs(cur), settings_from(args))
    sys.stdout.write(comparison.markdown())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(comparison.as_json(), indent=2) + "\n")
    return comparison.exit_code
