"""The CI gate on real runs: ``mailbench bench-ci`` measures four short paired rounds of
a baseline and a candidate whose POST /send sleeps 5 ms more, side by side, and fails it;
the same code twice passes.

On this kind of machine a queued send takes a few ms, so 5 ms doubles the gap: the test
is of the plumbing (rounds, pairing, the tables, the exit codes); the rates of false
alarms and detections at bench-ci's own six rounds and 2 ms are measured by
``benchmarks/gate_calibration.py`` (docs/gate.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main as mailbench

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

ROUNDS = 4
BENCH = ["--modes", "sqlite", "--users", "20", "--duration", "8", "--rounds", str(ROUNDS)]


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp("gate") / "ci"
    argv = ["bench-ci", *BENCH, "--candidate-delay-ms", "5", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "harness.cli", *argv],
        capture_output=True,
        text=True,
        timeout=360,
    )
    assert done.returncode in (0, 1), done.stdout + done.stderr
    return done.returncode, out


def row(data: dict[str, object], metric: str) -> dict[str, object]:
    rows = data["rows"]
    assert isinstance(rows, list)
    return next(r for r in rows if r["mode"] == "sqlite" and r["metric"] == metric)


def test_a_2ms_slower_send_path_fails_the_paired_rounds(bench: tuple[int, Path]) -> None:
    code, out = bench
    data = json.loads((out / "compare.json").read_text())
    assert code == 1, (out / "compare.md").read_text()
    assert data["settings"]["paired"] is True and data["settings"]["schedule"] == "concurrent"
    gap = row(data, "gap (send/form p50)")
    assert gap["verdict"] == "regression" and gap["n_baseline"] == gap["n_current"] == ROUNDS
    assert row(data, "lost")["current"] == 0
    table = (out / "compare.md").read_text()
    assert f"{ROUNDS} baseline and {ROUNDS} current runs (concurrent)" in table
    entries = json.loads((out / "benchmark.json").read_text())
    assert any(e["name"] == "sqlite gap (send/form p50)" for e in entries)
    for side in ("baseline", "candidate"):
        assert sorted(p.name for p in (out / side).iterdir()) == [
            f"round-{n + 1}" for n in range(ROUNDS)
        ]


def test_the_same_code_twice_passes(
    bench: tuple[int, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Baseline rounds against baseline rounds: the same code, measured apart."""
    _, out = bench
    rounds = [out / "baseline" / f"round-{n + 1}" / "latest" for n in range(ROUNDS)]
    code = mailbench(
        ["compare", str(rounds[0]), str(rounds[1]), "--json", str(tmp_path / "c.json")]
    )
    text = capsys.readouterr().out
    assert code == 0, text
    assert "| sqlite lost | 0 | 0 |" in text


def test_compare_of_the_rounds_by_hand_agrees(
    bench: tuple[int, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, out = bench
    sides = {
        side: ",".join(str(out / side / f"round-{n + 1}" / "latest") for n in range(ROUNDS))
        for side in ("baseline", "candidate")
    }
    argv = ["compare", "--baseline", sides["baseline"], "--current", sides["candidate"]]
    assert mailbench([*argv, "--paired", "--schedule", "concurrent"]) == 1
    assert "**REGRESSION**" in capsys.readouterr().out


def test_a_folder_that_is_not_a_results_folder_is_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert mailbench(["compare", str(tmp_path), str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not a mailbench results folder" in err, err
