"""Memory over a long load: does the load generator or the server grow while it runs?

Starts ``mailbench run`` against one mode with a closed-model load for ``--minutes``,
finds its Locust processes and its server processes among the run's descendants, and
samples their resident memory (RSS, psutil) every ``--every`` seconds until the load
ends. Prints, per kind of process, the RSS at the start and the end of the load and the
growth per hour: the slope of a least-squares line through the samples after the first
minute (allocators and caches settle in it), summed over the processes of that kind, and
over the second half of the load alone: a store that fills up to a bound grows in the
first and not in the second; one without a bound grows in both.

    .venv/bin/python benchmarks/soak_memory.py [--mode direct] [--minutes 10] [--users 10]
        [--scenario sender] [--locust-procs 0] [--every 5] [--checkout DIR] [--csv FILE]

``--checkout DIR`` runs the mailbench of another checkout (a ``git worktree`` of an older
commit, say) with this interpreter, to measure before and after side by side.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import psutil

SETTLE_S = 60.0  # samples before this are not in the slope


def kind_of(process: psutil.Process) -> str | None:
    try:
        argv = process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    if "locust" in argv:
        return "locust"
    if "harness.cli" in argv and "serve" in argv:
        return "server"
    return None


def rss_by_kind(root: psutil.Process) -> dict[str, tuple[int, int]]:
    """kind -> (processes, summed RSS in bytes) of the run's descendants."""
    found: defaultdict[str, list[int]] = defaultdict(list)
    try:
        children = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    for child in children:
        kind = kind_of(child)
        if kind is None:
            continue
        try:
            found[kind].append(child.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return {kind: (len(values), sum(values)) for kind, values in found.items()}


def growth_per_hour(samples: list[tuple[float, int]], after_s: float = SETTLE_S) -> float | None:
    """MB per hour: the slope of RSS over time after ``after_s`` seconds of load."""
    settled = [(t, rss) for t, rss in samples if t >= after_s]
    if len(settled) < 3:
        return None
    slope = statistics.linear_regression([t for t, _ in settled], [r for _, r in settled]).slope
    return slope * 3600 / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="direct")
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the load")
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--scenario", default="sender")
    parser.add_argument("--locust-procs", type=int, default=0)
    parser.add_argument("--latency", default="uniform:0.5,1.0")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--csv", type=Path, help="also write every sample here")
    args = parser.parse_args()

    out = Path(tempfile.mkdtemp(prefix="mailbench-soak-"))
    argv = [sys.executable, "-m", "harness.cli", "run", "--modes", args.mode,
            "--scenario", args.scenario, "--users", str(args.users),
            "--duration", f"{args.minutes * 60:g}", "--latency", args.latency,
            "--out", str(out)]  # fmt: skip
    if args.locust_procs:
        argv += ["--locust-procs", str(args.locust_procs)]
    log = (out / "soak.log").open("w")
    run = subprocess.Popen(argv, cwd=args.checkout, stdout=log, stderr=subprocess.STDOUT)
    root = psutil.Process(run.pid)
    samples: defaultdict[str, list[tuple[float, int]]] = defaultdict(list)
    counts: dict[str, int] = {}
    rows: list[tuple[float, str, int, int]] = []
    started: float | None = None
    try:
        while run.poll() is None:
            now = rss_by_kind(root)
            if "locust" in now:
                started = started if started is not None else time.monotonic()
                at = time.monotonic() - started
                for kind, (processes, rss) in now.items():
                    samples[kind].append((at, rss))
                    counts[kind] = max(counts.get(kind, 0), processes)
                    rows.append((round(at, 1), kind, processes, rss))
            elif started is not None:
                break  # the load is over; the run drains and reports
            time.sleep(args.every)
        run.wait(timeout=600)
    finally:
        if run.poll() is None:
            run.terminate()
            run.wait(timeout=60)
        log.close()
    if args.csv:
        with args.csv.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(("second", "kind", "processes", "rss_bytes"))
            writer.writerows(rows)
    checkout = os.path.relpath(args.checkout)
    procs = args.locust_procs or 1
    print(f"{args.mode}, {args.scenario}, {args.users} users, {args.minutes:g} min, "
          f"locust procs {procs}, checkout {checkout}; results in {out}")  # fmt: skip
    header = f"{'process':<8} {'n':>2} {'RSS start':>10} {'RSS end':>10}"
    print(f"{header} {'growth':>12} {'2nd half':>12}")
    for kind in ("locust", "server"):
        series = samples.get(kind, [])
        if not series:
            print(f"{kind:<8} no samples")
            continue
        growth = [growth_per_hour(series), growth_per_hour(series, series[-1][0] / 2)]
        text = " ".join(f"{g:+9.1f} MB/h" if g is not None else "   too short" for g in growth)
        first, last = series[0][1] / 1e6, series[-1][1] / 1e6
        print(f"{kind:<8} {counts[kind]:>2} {first:>7.1f} MB {last:>7.1f} MB {text}")
    return 0 if run.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
