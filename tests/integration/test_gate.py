"""The CI gate on real runs: unchanged code passes, a 2 ms slower send path fails.

Three short SQLite runs at the same time (as ``make bench-ci`` runs its two sides), so
whatever else this machine does hits all three alike: a baseline, an unchanged rerun and
a run whose POST /send sleeps 2 ms more (``--inject-send-delay-ms 2``). On this kind of
machine a queued send takes a few ms, so 2 ms is a large change of the gap.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main as mailbench

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

RUN = ["--modes", "sqlite", "--scenario", "sender", "--users", "10", "--duration", "25"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gate")
    extra = {"base": [], "rerun": [], "slow": ["--inject-send-delay-ms", "2"]}
    # Started together, so that their loads overlap as far as their start-ups allow.
    started = {
        name: subprocess.Popen(
            [sys.executable, "-m", "harness.cli", "run", *RUN, *args, "--out", str(root / name)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, args in extra.items()
    }
    for name, process in started.items():
        output, _ = process.communicate(timeout=200)
        assert process.returncode == 0, f"{name} run failed:\n{output}"
    return {name: root / name / "latest" for name in started}


def gap_row(path: Path) -> dict[str, object]:
    rows = json.loads(path.read_text())["rows"]
    return next(r for r in rows if r["mode"] == "sqlite" and r["metric"] == "gap (send/form p50)")


def test_unchanged_code_passes(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = mailbench(
        ["compare", str(runs["base"]), str(runs["rerun"]), "--json", str(tmp_path / "c.json")]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert gap_row(tmp_path / "c.json")["verdict"] in ("ok", "faster"), out
    assert "| sqlite lost | 0 | 0 |" in out


def test_a_2ms_slower_send_path_is_flagged(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Against both unchanged runs pooled (twice the baseline seconds)."""
    baseline = f"{runs['base']},{runs['rerun']}"
    argv = [
        "compare",
        "--baseline",
        baseline,
        str(runs["slow"]),
        "--json",
        str(tmp_path / "c.json"),
    ]
    code = mailbench(argv)
    out = capsys.readouterr().out
    assert code == 1, out
    assert gap_row(tmp_path / "c.json")["verdict"] == "regression", out
    assert "| sqlite gap (send/form p50) |" in out and "**REGRESSION**" in out


def test_a_folder_that_is_not_a_results_folder_is_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert mailbench(["compare", str(tmp_path), str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not a mailbench results folder" in err, err
