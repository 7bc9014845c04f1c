"""``mailbench trend HISTORY…``: change points in the figures of successive main commits.

The gate compares one pull request with its base; a drift of 2% per merge passes every
gate and is 20% after ten. ``trend`` reads the history the CI workflow keeps — the
``benchmark.json`` file of each commit (github-action-benchmark's
``customSmallerIsBetter`` entries), or that action's ``data.js`` / ``data.json`` with all
of them — and looks in each figure's series for change points with PELT
(:mod:`ruptures`), on the log of the values, scaled by the series' own commit-to-commit
noise (the median absolute difference of neighbours, a robust sigma), with a BIC-like
penalty of ``--penalty`` × log(n) per change point and segments of at least
``--min-size`` commits. A change point is reported when the means either side of it
differ by at least ``--min-change``; an upward one (the figures are smaller-is-better)
is a regression, and ``--check`` exits 1 on one.

    mailbench trend results/history/*.json [--check] [--min-change 0.05]
    mailbench trend gh-pages/dev/bench/data.js --name mailbench
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ruptures

from harness.errors import ConfigError, ResultsError

MAD_TO_SIGMA = 1.4826  # the MAD of normal data times this is its sigma


@dataclass(frozen=True, slots=True)
class Point:
    """One commit's figures: its label (the commit, or the file) and name → value."""

    label: str
    values: dict[str, float]


@dataclass(frozen=True, slots=True)
class Change:
    figure: str
    index: int  # the first commit of the new level
    label: str
    before: float  # geometric means of the segments either side
    after: float

    @property
    def change(self) -> float:
        return self.after / self.before - 1

    @property
    def regression(self) -> bool:
        return self.change > 0


def read_history(paths: Sequence[Path], name: str | None = None) -> list[Point]:
    """The commits in the order given; a data.js holds its own order (oldest first)."""
    points: list[Point] = []
    for path in paths:
        if path.is_dir():
            points += read_history(sorted(path.glob("*.json")), name)
            continue
        try:
            text = path.read_text()
        except OSError as exc:
            raise ResultsError(f"cannot read the history file {path}: {exc.strerror}") from exc
        if text.lstrip().startswith("window.BENCHMARK_DATA"):
            text = text.split("=", 1)[1]
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ResultsError(f"{path} is not JSON: {exc.msg} at line {exc.lineno}") from exc
        points += _points(data, path, name)
    return points


def _points(data: Any, path: Path, name: str | None) -> list[Point]:
    if isinstance(data, list):  # one commit's benchmark.json
        return [Point(path.stem, _values(data, path))]
    if isinstance(data, dict) and isinstance(data.get("entries"), dict):
        suites = data["entries"]
        if name is None and len(suites) == 1:
            name = next(iter(suites))
        if name not in suites:
            raise ConfigError(f"{path} holds {', '.join(suites)}: pick one with --name.")
        return [
            Point(
                str(commit.get("commit", {}).get("id", "?"))[:10], _values(commit["benches"], path)
            )
            for commit in suites[name]
        ]
    raise ResultsError(f"{path} is neither a benchmark.json nor github-action-benchmark's data.js")


def _values(entries: Any, path: Path) -> dict[str, float]:
    try:
        return {str(e["name"]): float(e["value"]) for e in entries}
    except (TypeError, KeyError, ValueError) as exc:
        raise ResultsError(f"{path}: an entry without a numeric name/value ({exc})") from exc


def noise(logs: Sequence[float]) -> float:
    """The sigma of one commit's figure around its level, from neighbours' differences: robust to
    the level shifts being looked for, which are few."""
    diffs = [abs(b - a) for a, b in itertools.pairwise(logs)]
    return MAD_TO_SIGMA * statistics.median(diffs) / math.sqrt(2) if diffs else 0.0


def change_points(
    points: Sequence[Point],
    min_change: float = 0.05,
    penalty: float = 5.0,
    min_size: int = 3,
) -> list[Change]:
    found: list[Change] = []
    names = dict.fromkeys(n for p in points for n in p.values)
    for figure in names:
        series = [
            (i, p.values[figure]) for i, p in enumerate(points) if p.values.get(figure, 0) > 0
        ]
        if len(series) < 2 * min_size:
            continue
        logs = np.array([math.log(v) for _, v in series])
        sigma = max(noise(list(logs)), 1e-3)  # a figure that never moved: 0.1% resolution
        algo = ruptures.Pelt(model="l2", min_size=min_size, jump=1).fit(logs / sigma)
        ends = algo.predict(pen=penalty * math.log(len(logs)))
        bounds = [0, *ends]  # segment k is logs[bounds[k]:bounds[k + 1]]
        for a, b, c in zip(bounds, bounds[1:], bounds[2:], strict=False):
            before, after = math.exp(logs[a:b].mean()), math.exp(logs[b:c].mean())
            if abs(after / before - 1) >= min_change:
                index = series[b][0]
                found.append(Change(figure, index, points[index].label, before, after))
    return found


def render(points: Sequence[Point], changes: Sequence[Change], min_change: float) -> str:
    lines = [
        f"### mailbench trend: {len(points)} commits, "
        f"{sum(c.regression for c in changes)} regression(s), "
        f"{sum(not c.regression for c in changes)} improvement(s)",
        "",
        f"Change points (PELT) of at least {min_change:.0%} between the levels either side.",
        "",
    ]
    if not changes:
        return "\n".join([*lines, "No change point.", ""])
    lines += [
        "| figure | from commit | before | after | change | |",
        "|---|---|---:|---:|---:|---|",
        *(
            f"| {c.figure} | {c.label} (#{c.index + 1}) | {c.before:,.4g} | {c.after:,.4g} | "
            f"{c.change:+.1%} | {'**regression**' if c.regression else 'improvement'} |"
            for c in changes
        ),
    ]
    return "\n".join(lines) + "\n"


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("history", nargs="+", type=Path, metavar="HISTORY")
    parser.add_argument("--name", help="the suite in a data.js (default: its only one)")
    parser.add_argument("--min-change", type=float, default=0.05, help="default 0.05 (5%%)")
    parser.add_argument("--penalty", type=float, default=5.0, help="× log(n) per change point")
    parser.add_argument("--min-size", type=int, default=3, help="commits a level, at least")
    parser.add_argument("--check", action="store_true", help="exit 1 on an upward change point")
    parser.add_argument("--json", type=Path, help="also write the change points here")


def cli_main(args: argparse.Namespace) -> int:
    if args.min_size < 2 or args.penalty <= 0 or args.min_change < 0:
        raise ConfigError("--min-size must be at least 2, --penalty above 0, --min-change ≥ 0.")
    points = read_history(args.history, args.name)
    changes = change_points(points, args.min_change, args.penalty, args.min_size)
    sys.stdout.write(render(points, changes, args.min_change))
    if args.json:
        rows = [{**asdict(c), "change": c.change} for c in changes]
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if args.check and any(c.regression for c in changes) else 0
