"""``mailbench bench-ci`` (``make bench-ci``): baseline and candidate measured in the same job,
then the gate.

A comparison against a number stored from another machine and another hour either misses
regressions or cries wolf; so both sides are measured here, now, on this machine:

* ``--schedule concurrent`` (default): the baseline and the candidate run *at the same
  time*, each with its own fake Mailgun, server, workers, Locust and brokers. Whatever
  else the machine does (a neighbour's build, a noisy CI host) hits both sides alike,
  which back-to-back runs cannot promise: on a shared 2-core box two sequential runs of
  the same code differed by up to 45% in the gap.
* ``--schedule sequential``: baseline, then candidate (``--rounds N`` alternates them).

By default both sides are this checkout (a repeat: what the gate says of unchanged code).
``--baseline-commit REF`` measures REF from a ``git worktree`` beside it; ``--baseline-dir``
compares against folders measured before. ``--candidate-delay-ms`` injects a known delay
into the candidate's POST /send, to see the gate catch it.

Writes ``OUT/compare.md``, ``OUT/compare.json`` and ``OUT/benchmark.json`` (the
``customSmallerIsBetter`` format of github-action-benchmark) and exits with the verdict:
0 pass, 1 regression, 2 the benchmark itself failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import ConfigError, ProcessFailed
from harness.gate.compare import (
    SCHEDULES,
    Comparison,
    GateSettings,
    Row,
    compare_runs,
    load_runs,
)
from harness.process import port_taken
from harness.services.manager import Services
from harness.services.settings import ENV_VARS, ServiceSettings
from servers.modes import MODES, parse_modes

REPO = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 900.0


@dataclass(frozen=True, slots=True)
class Side:
    """One side of the comparison: where its code lives and how its runs differ."""

    name: str  # "baseline" or "candidate"
    source: Path  # the checkout whose code runs
    knobs: tuple[str, ...] = ()  # extra ``mailbench run`` options: injected slowdowns


def knobs(
    delay_ms: float = 0.0, send_work_us: float = 0.0, form_work_us: float = 0.0
) -> tuple[str, ...]:
    """The ``mailbench run`` options that inject a known slowdown into a side."""
    given = (
        ("--inject-send-delay-ms", delay_ms),
        ("--inject-send-work-us", send_work_us),
        ("--inject-form-work-us", form_work_us),
    )
    return tuple(part for flag, value in given if value for part in (flag, f"{value:g}"))


def run_args(args: argparse.Namespace) -> list[str]:
    return [
        "--modes", args.modes, "--scenario", args.scenario, "--users", str(args.users),
        "--duration", str(args.duration), "--latency", args.latency, "--seed", str(args.seed),
    ]  # fmt: skip


def start_run(
    side: Side, argv: Sequence[str], out: Path, env: Mapping[str, str]
) -> subprocess.Popen[bytes]:
    """``mailbench run`` as a subprocess, from the side's own checkout."""
    command = [sys.executable, "-m", "harness.cli", "run", *argv, "--out", str(out)]
    command += side.knobs
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "run.log").open("ab")
    child_env = {**env, "PYTHONPATH": str(side.source)}  # that checkout's packages first
    print(f"bench-ci: {side.name}: {' '.join(command[2:])}", flush=True)
    with log:
        return subprocess.Popen(command, cwd=side.source, env=child_env, stdout=log, stderr=log)


def wait_runs(runs: Sequence[tuple[Side, subprocess.Popen[bytes], Path]]) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    failed = []
    for side, process, out in runs:
        try:
            code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.terminate()  # the harness stops its children on SIGTERM
            code = process.wait(timeout=60)
        if code != 0:
            tail = (out / "run.log").read_text(errors="replace").splitlines()[-15:]
            failed.append(f"the {side.name} run failed (exit {code}):\n" + "\n".join(tail))
    if failed:
        raise ProcessFailed("\n".join(failed))


def free_ports(count: int) -> list[int]:
    """Below the ephemeral range, so an outgoing connection cannot take one meanwhile."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(20000, 32000)
        if port not in ports and not port_taken(port):
            ports.append(port)
    return ports


@contextlib.contextmanager
def brokers(modes: Sequence[str], base: Path, env: Mapping[str, str]) -> Iterator[dict[str, str]]:
    """Private brokers for one side on free ports (a shared machine may hold the default
    ones), as the environment variables that ``mailbench run`` reads."""
    needed: dict[str, None] = {}  # the brokers of the modes, each once, in order
    for mode in modes:
        if (service := MODES[mode].service) is not None and not env.get(ENV_VARS[service]):
            needed[service] = None
    wanted = list(needed)
    amqp, dist, epmd, redis, postgres, sqs = free_ports(6)
    settings = ServiceSettings(
        base_dir=base, rabbitmq_port=amqp, rabbitmq_dist_port=dist, epmd_port=epmd,
        redis_port=redis, postgres_port=postgres, sqs_port=sqs, env=dict(env),
    )  # fmt: skip
    with Services(settings) as services:
        yield {ENV_VARS[name]: services.start(name) for name in wanted}


@contextlib.contextmanager
def worktree(ref: str, parent: Path) -> Iterator[Path]:
    """``ref`` checked out beside this checkout, removed afterwards."""
    path = parent / "baseline-src"
    git = ["git", "-C", str(REPO), "worktree"]
    done = subprocess.run([*git, "add", "--detach", str(path), ref], capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError(f"cannot check out {ref!r} as the baseline: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run([*git, "remove", "--force", str(path)], capture_output=True)


@contextlib.contextmanager
def side_brokers(
    modes: Sequence[str], sides: Sequence[Side], tmp: Path, env: Mapping[str, str]
) -> Iterator[dict[str, dict[str, str]]]:
    """Each side its own brokers (concurrent runs must not share queues or a disk): side
    name → the environment variables that point ``mailbench run`` at them."""
    with contextlib.ExitStack() as stack:
        yield {s.name: stack.enter_context(brokers(modes, tmp / s.name, env)) for s in sides}


def run_round(
    n: int,
    sides: Sequence[Side],
    argv: Sequence[str],
    out: Callable[[Side], Path],
    env: Mapping[str, Mapping[str, str]],
    schedule: str = "concurrent",
) -> dict[str, Path]:
    """Round ``n`` (from 0): every side once, at the same time or one after the other;
    who starts first alternates from round to round, in case starting first is an
    advantage. Returns side name → results folder."""
    order = list(sides) if n % 2 == 0 else list(reversed(sides))
    batch = []
    for side in order:
        process = start_run(side, argv, out(side), env[side.name])
        batch.append((side, process, out(side)))
        if schedule == "sequential":
            wait_runs(batch[-1:])
    wait_runs([run for run in batch if run[1].returncode is None])
    return {side.name: folder / "latest" for side, _, folder in batch}


def measure(args: argparse.Namespace, sides: Sequence[Side], tmp: Path) -> dict[str, list[Path]]:
    """Run every side ``--rounds`` times; returns the results folders of each side, in
    round order (round k of one side is the pair of round k of the other)."""
    env = dict(os.environ)
    modes = parse_modes(args.modes)
    folders: dict[str, list[Path]] = {side.name: [] for side in sides}
    for side in sides:  # no stale rounds of an earlier invocation among the artifacts
        shutil.rmtree(args.out / side.name, ignore_errors=True)
    with side_brokers(modes, sides, tmp, env) as urls:
        for n in range(args.rounds):

            def out(side: Side, n: int = n) -> Path:
                return Path(args.out) / side.name / f"round-{n + 1}"

            side_env = {name: {**env, **urls[name]} for name in urls}
            done = run_round(n, sides, run_args(args), out, side_env, args.schedule)
            for name, folder in done.items():
                folders[name].append(folder)
    return folders


def benchmark_entries(comparison: Comparison) -> list[dict[str, Any]]:
    """The current figures in github-action-benchmark's ``customSmallerIsBetter`` form."""
    units = {"µs": "us", "×": "x", "%": "%", "emails": "emails"}
    entries = []
    for row in comparison.rows:
        if row.current is None or row.unit not in units:
            continue
        scale = 100.0 if row.unit == "%" else 1.0
        entries.append(
            {
                "name": f"{row.mode} {row.metric}",
                "unit": units[row.unit],
                "value": round(row.current * scale, 4),
                # the spread between the current runs, in log terms (≈ a share of the value)
                "range": f"± {row.spread:.1%}" if row.spread is not None else "",
                "extra": _extra(row),
            }
        )
    return entries


def _extra(row: Row) -> str:
    parts = [f"verdict: {row.verdict}"]
    if row.baseline is not None:
        parts.append(f"baseline: {row.baseline:.6g}")
    if row.change is not None:
        parts.append(f"change: {row.change:+.1%}")
    if row.p_value is not None:
        parts.append(f"p: {row.p_value:.2g} over {row.n_baseline}/{row.n_current} s")
    return "; ".join(parts)


def write_outputs(comparison: Comparison, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(comparison.markdown())
    (out / "compare.json").write_text(json.dumps(comparison.as_json(), indent=2) + "\n")
    entries = benchmark_entries(comparison)
    (out / "benchmark.json").write_text(json.dumps(entries, indent=2, ensure_ascii=False) + "\n")


ROUNDS = 6  # chosen from the measured calibration: docs/gate.md


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--modes", default="sqlite,redis")
    parser.add_argument("--scenario", default="sender", help="sender: every user only sends")
    parser.add_argument(
        "--users",
        type=int,
        default=20,
        help="enough requests that a run's p50 is known to a few %%, few enough that the "
        "two sides' own load stays light (docs/gate.md)",
    )
    parser.add_argument("--duration", type=float, default=20, help="seconds of load per mode")
    parser.add_argument("--latency", default="uniform:0.5,1.0")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--schedule", choices=SCHEDULES, default="concurrent")
    parser.add_argument(
        "--rounds",
        type=int,
        default=ROUNDS,
        help=f"runs a side, in rounds; the gate tests across them (default {ROUNDS})",
    )
    parser.add_argument("--out", type=Path, default=Path("results/ci"))
    parser.add_argument("--baseline-commit", help="measure this git ref as the baseline")
    parser.add_argument("--baseline-dir", help="compare with these results folders (comma list)")
    knobs = parser.add_argument_group(
        "known slowdowns of the candidate, to see the gate catch them"
    )
    knobs.add_argument("--candidate-delay-ms", type=float, default=0.0, metavar="MS")
    knobs.add_argument("--candidate-send-work-us", type=float, default=0.0, metavar="US")
    knobs.add_argument("--candidate-form-work-us", type=float, default=0.0, metavar="US")
    defaults = GateSettings()
    parser.add_argument("--min-change", type=float, default=defaults.min_change)
    parser.add_argument("--alpha", type=float, default=defaults.alpha)
    parser.add_argument("--abs-band", type=float, default=defaults.abs_band)


def gate_settings(args: argparse.Namespace) -> GateSettings:
    """What bench-ci decides with: its rounds paired, on its schedule; folders measured
    before (``--baseline-dir``) are neither paired with these runs nor beside them."""
    return GateSettings(
        min_change=args.min_change,
        alpha=args.alpha,
        abs_band=args.abs_band,
        paired=not args.baseline_dir,
        schedule="sequential" if args.baseline_dir else args.schedule,
    )


def cli_main(args: argparse.Namespace) -> int:
    """``mailbench bench-ci``: measure both sides, compare, write the tables; exit 1 on a
    regression (the entry point answers 2, in one sentence, when a side cannot be had)."""
    if args.rounds < 1:
        raise ConfigError("--rounds must be at least 1.")
    if args.rounds < ROUNDS and not args.baseline_dir:
        print(
            f"bench-ci: {args.rounds} rounds, fewer than the {ROUNDS} the gate's rates were "
            "measured with (docs/gate.md): it will miss more of the changes it should catch",
            file=sys.stderr,
        )
    args.out = args.out.resolve()
    started = time.monotonic()
    settings = gate_settings(args)
    injected = knobs(
        args.candidate_delay_ms, args.candidate_send_work_us, args.candidate_form_work_us
    )
    with tempfile.TemporaryDirectory(prefix="mailbench-ci-") as tmp_name:
        tmp = Path(tmp_name)
        tmp.chmod(0o711)  # PostgreSQL runs as its own user and must reach its data
        candidate = Side("candidate", REPO, injected)
        with contextlib.ExitStack() as stack:
            if args.baseline_dir:
                sides: list[Side] = [candidate]
            elif args.baseline_commit:
                sides = [
                    Side("baseline", stack.enter_context(worktree(args.baseline_commit, tmp))),
                    candidate,
                ]
            else:
                sides = [Side("baseline", REPO), candidate]
            folders = measure(args, sides, tmp)
    if args.baseline_dir:
        folders["baseline"] = [Path(p) for p in args.baseline_dir.split(",") if p]
    comparison = compare_runs(
        load_runs(folders["baseline"]), load_runs(folders["candidate"]), settings
    )
    write_outputs(comparison, args.out)
    sys.stdout.write(comparison.markdown())
    print(f"bench-ci: {time.monotonic() - started:.0f} s; tables in {args.out}/", flush=True)
    return comparison.exit_code
