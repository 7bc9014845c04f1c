"""``mailbench trend``: change points in the history of main, on synthetic histories with
commit-to-commit noise; a planted step and a planted slow drift are found, noise alone
is not."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from harness.cli import main as mailbench
from harness.errors import ConfigError, ResultsError
from harness.gate.trend import Point, change_points, noise, read_history


def history(levels: list[float], sigma: float = 0.03, seed: int = 1) -> list[Point]:
    rng = random.Random(seed)
    return [
        Point(f"c{i:03d}", {"sqlite gap": level * rng.lognormvariate(0.0, sigma)})
        for i, level in enumerate(levels)
    ]


def test_noise_alone_has_no_change_point() -> None:
    """100 histories of 40 commits at 4% noise: at most one flagged (the default
    penalty's measured rate is 0.3% a series)."""
    flagged = sum(bool(change_points(history([2.5] * 40, 0.04, seed))) for seed in range(100))
    assert flagged <= 1, flagged


def test_a_step_is_found_where_it_is() -> None:
    changes = change_points(history([2.5] * 20 + [2.75] * 20))
    assert len(changes) == 1, changes
    step = changes[0]
    assert step.index == 20 and step.label == "c020" and step.regression
    assert step.change == pytest.approx(0.10, abs=0.03)


def test_a_slow_drift_no_single_commit_crosses_is_caught() -> None:
    """+1% a commit for 20 commits: no neighbour differs by more than the noise."""
    levels = [2.5 * 1.01 ** max(0, min(i - 10, 20)) for i in range(40)]
    changes = change_points(history(levels, 0.03))
    assert any(c.regression for c in changes), changes


def test_an_improvement_is_not_a_regression() -> None:
    changes = change_points(history([2.5] * 20 + [2.0] * 20))
    assert changes and not any(c.regression for c in changes)


def test_noise_is_robust_to_a_step() -> None:
    logs = [0.0, 0.01, -0.01, 0.0, 0.5, 0.51, 0.49, 0.5]
    assert noise(logs) < 0.05


def test_cli_reads_benchmark_json_files_and_data_js(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    points = history([2.5] * 10 + [3.0] * 10)
    files = []
    for p in points:
        path = tmp_path / f"{p.label}.json"
        path.write_text(
            json.dumps([{"name": n, "unit": "x", "value": v} for n, v in p.values.items()])
        )
        files.append(str(path))
    assert mailbench(["trend", *files]) == 0  # reported, not enforced
    out = capsys.readouterr().out
    assert "| sqlite gap | c010 (#11) |" in out and "**regression**" in out
    assert mailbench(["trend", str(tmp_path), "--check", "--json", str(tmp_path / "t.json")]) == 1
    assert json.loads((tmp_path / "t.json").read_text())[0]["index"] == 10

    commits = [
        {"commit": {"id": f"{i:02d}" * 20}, "benches": [{"name": "sqlite gap", "value": v}]}
        for i, p in enumerate(points)
        for v in p.values.values()
    ]
    data = tmp_path / "data.js"
    data.write_text("window.BENCHMARK_DATA = " + json.dumps({"entries": {"mailbench": commits}}))
    assert read_history([data])[10].label == "1010101010"
    assert mailbench(["trend", str(data), "--check"]) == 1


def test_bad_history_says_so(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(ResultsError, match="is not JSON"):
        read_history([tmp_path / "x.json"])
    (tmp_path / "y.json").write_text('{"a": 1}')
    with pytest.raises(ResultsError, match="neither a benchmark"):
        read_history([tmp_path / "y.json"])
    (tmp_path / "z.json").write_text(json.dumps({"entries": {"a": [], "b": []}}))
    with pytest.raises(ConfigError, match="--name"):
        read_history([tmp_path / "z.json"])
