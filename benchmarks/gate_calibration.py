"""How often the CI gate cries wolf, and how often it catches a known slowdown.

``collect`` measures a pool of *pairs*, each a baseline and a candidate run at the same
time with ``make bench-ci``'s configuration (its own brokers per side, who starts first
alternating), the candidate being one of four variants:

* ``aa``: the same code (an A/A pair: any regression the gate finds is a false alarm);
* ``delay2``: ``--inject-send-delay-ms 2``;
* ``send10``: ``--inject-send-work-us`` of 10% of the queued modes' send p50, a +10%
  change of the gap (measured on the first A/A pair, recorded in ``pool.json``);
* ``form10``: ``--inject-form-work-us`` of 10% of the form p50.

``analyse`` then draws gate decisions from the pool: each decision takes K pairs of one
variant, never one pair twice, and asks :func:`harness.gate.compare.compare_runs` with
bench-ci's settings, exactly as ``make bench-ci --rounds K`` would. It prints, per
variant, how many decisions found a regression, with a 95% Clopper–Pearson interval, and
the same over *disjoint* decisions only (no two sharing a pair), which are independent.

    python benchmarks/gate_calibration.py collect --out results/gate-calibration \\
        [--pairs 49] [--budget-min 60]
    python benchmarks/gate_calibration.py analyse results/gate-calibration \\
        [--rounds 6] [--decisions 500] [--json table.json]

``trend`` does the same for ``mailbench trend`` on simulated histories: how often pure
noise, a step and a slow drift are flagged, per penalty.

    python benchmarks/gate_calibration.py trend [--series 300] [--noise 0.04]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from scipy.stats import binomtest

from harness.gate import bench_ci, compare
from harness.gate.compare import Figure, GateSettings, compare_runs, load_runs
from harness.gate.trend import Point, change_points
from harness.results.folder import Run, load_run
from servers.modes import MODES, parse_modes

VARIANTS = ("aa", "delay2", "send10", "form10")
# The order pairs are measured in: A/A twice as often (false alarms are the rare event),
# the 2 ms delay (a change of about +80%) half as often as the 10% changes.
CYCLE = ("aa", "send10", "form10", "aa", "delay2", "send10", "form10")
SHARE = 0.10  # the +10% variants


def bench_ci_defaults(argv: Sequence[str] = ()) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_ci.add_cli_arguments(parser)
    return parser.parse_args(list(argv))


def p50(run: Run, metric: str) -> float:
    queued = [m for m in run.modes if MODES[m].queued]
    return statistics.fmean(row.p50_us for m in queued if (row := run.row(m, metric)))


def variant_knobs(variant: str, send_us: float, form_us: float) -> tuple[str, ...]:
    return {
        "aa": (),
        "delay2": bench_ci.knobs(delay_ms=2),
        "send10": bench_ci.knobs(send_work_us=round(SHARE * send_us)),
        "form10": bench_ci.knobs(form_work_us=round(SHARE * form_us)),
    }[variant]


def collect(args: argparse.Namespace) -> int:
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = bench_ci_defaults()
    argv = bench_ci.run_args(config)
    pool_file = out / "pool.json"
    pool: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "run": argv,
        "pairs": [],
    }
    cycle: Sequence[str] = CYCLE
    if args.more:  # more pairs of one variant, added to the pool measured before
        pool = json.loads(pool_file.read_text())
        pool.setdefault("more", []).append(" ".join(sys.argv))
        cycle = [args.more]
    first, spent = len(pool["pairs"]), float(pool.get("elapsed_s", 0.0))
    sized = pool.get("sized_on", {})
    started = time.monotonic()
    deadline = started + args.budget_min * 60
    env = dict(os.environ)
    sides = [bench_ci.Side("baseline", bench_ci.REPO), bench_ci.Side("candidate", bench_ci.REPO)]
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mailbench-cal-")))
        tmp.chmod(0o711)  # PostgreSQL runs as its own user and must reach its data
        urls = stack.enter_context(
            bench_ci.side_brokers(parse_modes(config.modes), sides, tmp, env)
        )
        side_env = {name: {**env, **found} for name, found in urls.items()}
        send_us, form_us = sized.get("send_p50_us", 0.0), sized.get("form_p50_us", 0.0)
        numbers = range(first, first + args.pairs)
        for n, variant in zip(numbers, itertools.cycle(cycle), strict=False):
            if time.monotonic() > deadline:
                print(f"calibration: the {args.budget_min:g} min budget is spent", flush=True)
                break
            knobs = variant_knobs(variant, send_us, form_us)
            pair = [
                bench_ci.Side("baseline", bench_ci.REPO),
                bench_ci.Side("candidate", bench_ci.REPO, knobs),
            ]
            folder = out / f"pair-{n + 1:03d}"
            t0 = time.monotonic()

            def out_of(side: bench_ci.Side, folder: Path = folder) -> Path:
                return folder / side.name

            done = bench_ci.run_round(n, pair, argv, out_of, side_env)
            seconds = time.monotonic() - t0
            if n == 0:  # the +10% slowdowns are sized on the first (A/A) pair
                runs = [load_run(done[s.name]) for s in pair]
                send_us = statistics.fmean(p50(r, "send") for r in runs)
                form_us = statistics.fmean(p50(r, "form") for r in runs)
                pool["sized_on"] = {"send_p50_us": send_us, "form_p50_us": form_us}
            pool["pairs"].append(
                {
                    "n": n + 1,
                    "variant": variant,
                    "knobs": list(knobs),
                    "baseline": str(done["baseline"].relative_to(out)),
                    "candidate": str(done["candidate"].relative_to(out)),
                    "seconds": round(seconds, 1),
                }
            )
            pool["elapsed_s"] = round(spent + time.monotonic() - started, 1)
            pool_file.write_text(json.dumps(pool, indent=2) + "\n")
            print(
                f"calibration: pair {n + 1} {variant} {' '.join(knobs)} {seconds:.0f} s", flush=True
            )
    print(
        f"calibration: {len(pool['pairs'])} pairs in {pool['elapsed_s'] / 60:.1f} min; {pool_file}"
    )
    return 0


# -- analysis ---------------------------------------------------------------------------


def load_pool(folder: Path) -> tuple[dict[str, Any], dict[str, list[tuple[Run, Run]]]]:
    pool = json.loads((folder / "pool.json").read_text())
    pairs: dict[str, list[tuple[Run, Run]]] = {v: [] for v in VARIANTS}
    for pair in pool["pairs"]:
        runs = load_runs([folder / pair["baseline"], folder / pair["candidate"]])
        pairs[pair["variant"]].append((runs[0], runs[1]))
    return pool, pairs


def decide(pairs: Sequence[tuple[Run, Run]], settings: GateSettings) -> list[str]:
    """The rows one gate decision over these pairs fails on (none: it passes)."""
    comparison = compare_runs([b for b, _ in pairs], [c for _, c in pairs], settings)
    return [f"{row.mode} {row.metric}" for row in comparison.regressions]


def draws(
    pairs: Sequence[tuple[Run, Run]], k: int, count: int, rng: random.Random, swap: bool
) -> list[list[tuple[Run, Run]]]:
    """``count`` decisions of ``k`` distinct pairs each (every subset once when there are
    fewer); with ``swap``, each pair's sides exchanged at random (an A/A pair's sides are
    the same code, so either may be the baseline)."""
    if math.comb(len(pairs), k) <= count:
        subsets = [list(c) for c in itertools.combinations(pairs, k)]
    else:
        subsets = [rng.sample(list(pairs), k) for _ in range(count)]
    if swap:
        subsets = [[(c, b) if rng.random() < 0.5 else (b, c) for b, c in s] for s in subsets]
    return subsets


def interval(hits: int, n: int) -> tuple[float, float]:
    ci = binomtest(hits, n).proportion_ci(confidence_level=0.95, method="exact")
    return float(ci.low), float(ci.high)


def log_ratios(pairs: Sequence[tuple[Run, Run]], figure: Figure) -> list[float]:
    found = [(figure(b), figure(c)) for b, c in pairs]
    return [math.log(c / b) for b, c in found if b and c]


FIGURES: dict[str, Callable[[str], Figure]] = {
    "gap": compare.gap,
    "send p50": lambda mode: compare.percentile(mode, "send", 50.0),
    "form p50": lambda mode: compare.percentile(mode, "form", 50.0),
    "send p99": lambda mode: compare.percentile(mode, "send", 99.0),
}


def effects(pairs: dict[str, list[tuple[Run, Run]]], modes: Sequence[str]) -> dict[str, Any]:
    """Per variant, mode and figure: the mean change over the pool's pairs and the SD of
    the pairs' log ratios (the between-run noise a decision over K pairs divides by √K)."""
    table: dict[str, Any] = {}
    for variant, found in pairs.items():
        for mode in modes:
            for name, make in FIGURES.items():
                d = log_ratios(found, make(mode))
                if len(d) >= 2:
                    table[f"{variant} {mode} {name}"] = {
                        "pairs": len(d),
                        "change": math.expm1(statistics.fmean(d)),
                        "sd": statistics.stdev(d),
                    }
    return table


def remember_figures() -> None:
    """Each run's figures computed once: thousands of decisions reuse the same runs, and
    a percentile of an HdrHistogram is a walk over its buckets."""
    figure_of = compare.percentile
    known: dict[tuple[Path, str, str, float], float | None] = {}

    def percentile(mode: str, metric: str, pct: float) -> Figure:
        of = figure_of(mode, metric, pct)

        def cached(run: Run) -> float | None:
            key = (run.path, mode, metric, pct)
            if key not in known:
                known[key] = of(run)
            return known[key]

        return cached

    compare.percentile = percentile


def analyse(args: argparse.Namespace) -> int:
    remember_figures()
    pool, pairs = load_pool(args.pool)
    config = bench_ci_defaults()
    settings = replace(
        bench_ci.gate_settings(config), min_change=args.min_change or config.min_change
    )
    rng = random.Random(args.seed)
    modes = parse_modes(config.modes)
    seconds = statistics.fmean(p["seconds"] for p in pool["pairs"])
    result: dict[str, Any] = {
        "pool": str(args.pool),
        "pairs": {v: len(found) for v, found in pairs.items()},
        "pool_minutes": round(pool.get("elapsed_s", 0) / 60, 1),
        "pair_seconds": round(seconds, 1),
        "sized_on": pool.get("sized_on"),
        "settings": {"min_change": settings.min_change, "alpha": settings.alpha},
        "effects": effects(pairs, modes),
        "by_rounds": {},
    }
    lines = [
        f"Pool {args.pool}: {', '.join(f'{v} {len(f)}' for v, f in pairs.items())} pairs, "
        f"{result['pool_minutes']} min ({seconds:.0f} s a pair); gate: min change "
        f"{settings.min_change:.0%}, alpha {settings.alpha:g} (Holm), paired, concurrent.",
        "",
        "| K | variant | decisions | fail | rate | 95% CI | disjoint: fail/n | "
        "rows that failed (decisions) |",
        "|---:|---|---:|---:|---:|---|---:|---|",
    ]
    for k in args.rounds:
        by_variant = {}
        # A/A twice: sides as measured (what bench-ci decides on), and exchanged at random
        # (the same code either side: a check that neither side is favoured).
        cases = [(v, v, False) for v in VARIANTS] + [("aa, sides swapped", "aa", True)]
        for variant, source, swap in cases:
            found = pairs[source]
            if len(found) < k:
                continue
            decisions = draws(found, k, args.decisions, rng, swap=swap)
            failed = [rows for d in decisions if (rows := decide(d, settings))]
            shuffled = rng.sample(found, len(found))
            disjoint = [shuffled[i : i + k] for i in range(0, len(found) - k + 1, k)]
            disjoint_failed = sum(bool(decide(d, settings)) for d in disjoint)
            low, high = interval(len(failed), len(decisions))
            counted = collections.Counter(r for f in failed for r in f)
            rows = [f"{row} {count}" for row, count in sorted(counted.items())]
            by_variant[variant] = {
                "decisions": len(decisions),
                "failed": len(failed),
                "rate": len(failed) / len(decisions),
                "ci95": [low, high],
                "disjoint": [disjoint_failed, len(disjoint)],
                "rows": rows,
            }
            lines.append(
                f"| {k} | {variant} | {len(decisions)} | {len(failed)} | "
                f"{len(failed) / len(decisions):.1%} | {low:.1%}–{high:.1%} | "
                f"{disjoint_failed}/{len(disjoint)} | {', '.join(rows[:4])} |"
            )
        result["by_rounds"][str(k)] = {
            "bench_ci_minutes": round(k * seconds / 60, 1),
            "variants": by_variant,
        }
    lines += ["", "Per pair (the between-run noise), log ratio candidate/baseline:", ""]
    lines += ["| variant, mode, figure | pairs | mean change | SD |", "|---|---:|---:|---:|"]
    lines += [
        f"| {name} | {e['pairs']} | {e['change']:+.1%} | {e['sd']:.1%} |"
        for name, e in result["effects"].items()
    ]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


# -- mailbench trend, on simulated histories -------------------------------------------


def trend(args: argparse.Namespace) -> int:
    """How often ``mailbench trend`` flags a history of pure noise, a step and a drift:
    ``--series`` simulated histories of ``--commits`` commits each, the commit-to-commit
    noise lognormal with sigma ``--noise``."""
    rng = random.Random(args.seed)
    n, sigma = args.commits, args.noise
    shapes: dict[str, Callable[[int], float]] = {
        "noise only": lambda i: 1.0,
        f"step of +10% at commit {n // 2}": lambda i: 1.10 if i >= n // 2 else 1.0,
        "drift of +1% a commit for 20 commits": lambda i: 1.01 ** max(0, min(i - n // 4, 20)),
    }
    lines = [
        f"{args.series} simulated histories of {n} commits, lognormal noise of sigma "
        f"{sigma:.0%} a commit.",
        "",
        "| penalty × log(n) | history | flagged (an upward change point) | 95% CI |",
        "|---:|---|---:|---|",
    ]
    for penalty in args.penalties:
        for name, level in shapes.items():
            flagged = 0
            for _ in range(args.series):
                points = [
                    Point(str(i), {"gap": 2.5 * level(i) * rng.lognormvariate(0.0, sigma)})
                    for i in range(n)
                ]
                found = change_points(points, args.min_change, penalty)
                flagged += any(c.regression for c in found)
            low, high = interval(flagged, args.series)
            lines.append(
                f"| {penalty:g} | {name} | {flagged}/{args.series} = {flagged / args.series:.1%} "
                f"| {low:.1%}–{high:.1%} |"
            )
    print("\n".join(lines))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("collect", help="measure a pool of pairs")
    c.add_argument("--out", type=Path, default=Path("results/gate-calibration"))
    c.add_argument("--pairs", type=int, default=49)
    c.add_argument("--budget-min", type=float, default=60, help="stop starting pairs after this")
    c.add_argument("--more", choices=VARIANTS, help="add --pairs pairs of this variant to --out")
    a = commands.add_parser("analyse", help="gate decisions drawn from a pool")
    a.add_argument("pool", type=Path)
    a.add_argument(
        "--rounds",
        type=lambda text: [int(k) for k in text.split(",")],
        default=[bench_ci.ROUNDS],
        help="K, the rounds of one decision (a comma list compares several)",
    )
    a.add_argument("--decisions", type=int, default=500, help="per variant and K")
    a.add_argument("--min-change", type=float, help="default: bench-ci's")
    a.add_argument("--seed", type=int, default=1)
    a.add_argument("--json", type=Path)
    t = commands.add_parser("trend", help="mailbench trend on simulated histories")
    t.add_argument("--series", type=int, default=300)
    t.add_argument("--commits", type=int, default=40)
    t.add_argument("--noise", type=float, default=0.04, help="sigma a commit, default 0.04")
    t.add_argument("--min-change", type=float, default=0.05)
    t.add_argument(
        "--penalties",
        type=lambda text: [float(p) for p in text.split(",")],
        default=[3.0, 5.0, 8.0],
    )
    t.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    run = {"collect": collect, "analyse": analyse, "trend": trend}[args.command]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
