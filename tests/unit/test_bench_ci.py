"""``mailbench bench-ci``'s plumbing without running anything: the injected slowdowns,
the rounds' order, and how the two sides are compared."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from harness.errors import ConfigError
from harness.gate import bench_ci


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_ci.add_cli_arguments(parser)
    return parser.parse_args(list(argv))


def test_knobs_are_run_options() -> None:
    assert bench_ci.knobs() == ()
    assert bench_ci.knobs(delay_ms=2) == ("--inject-send-delay-ms", "2")
    assert bench_ci.knobs(send_work_us=250, form_work_us=120.5) == (
        "--inject-send-work-us", "250", "--inject-form-work-us", "120.5",
    )  # fmt: skip


def test_defaults_are_six_paired_rounds() -> None:
    args = parse()
    assert (args.rounds, args.schedule, args.users, args.duration) == (6, "concurrent", 20, 20)
    assert bench_ci.run_args(args)[:2] == ["--modes", "sqlite,redis"]


def test_rounds_alternate_who_starts_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    started: list[str] = []

    class Done:
        returncode = 0

    def start(side: bench_ci.Side, argv: Any, out: Path, env: Any) -> Done:
        started.append(side.name)
        return Done()

    monkeypatch.setattr(bench_ci, "start_run", start)
    monkeypatch.setattr(bench_ci, "wait_runs", lambda runs: None)
    sides = [bench_ci.Side("baseline", tmp_path), bench_ci.Side("candidate", tmp_path)]
    env = {"baseline": {}, "candidate": {}}
    for n in range(3):
        done = bench_ci.run_round(n, sides, [], lambda s: tmp_path / s.name, env)
        assert done == {s.name: tmp_path / s.name / "latest" for s in sides}
    assert started == ["baseline", "candidate", "candidate", "baseline", "baseline", "candidate"]


def test_paired_unless_the_baseline_was_measured_apart(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: dict[str, Any] = {}

    def measure(args: argparse.Namespace, sides: Any, tmp: Path) -> dict[str, list[Path]]:
        seen["sides"] = [(s.name, s.knobs) for s in sides]
        return {s.name: [] for s in sides}

    def compare(base: Any, cur: Any, settings: Any) -> Any:
        seen["settings"] = settings
        raise SystemExit(0)

    monkeypatch.setattr(bench_ci, "measure", measure)
    monkeypatch.setattr(bench_ci, "compare_runs", compare)
    monkeypatch.setattr(bench_ci, "load_runs", lambda paths: [])
    with pytest.raises(SystemExit):
        bench_ci.cli_main(parse("--out", str(tmp_path), "--candidate-send-work-us", "300"))
    assert seen["settings"].paired and seen["settings"].schedule == "concurrent"
    assert seen["sides"] == [("baseline", ()), ("candidate", ("--inject-send-work-us", "300"))]
    with pytest.raises(SystemExit):
        bench_ci.cli_main(parse("--out", str(tmp_path), "--baseline-dir", "a,b"))
    assert not seen["settings"].paired and seen["settings"].schedule == "sequential"
    with pytest.raises(ConfigError, match="--rounds"):
        bench_ci.cli_main(parse("--rounds", "0"))
