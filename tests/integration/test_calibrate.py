"""``mailbench calibrate`` on a short run: the table is produced, each case measured through
the real scenario, recorder and Locust, and a slower case measures slower."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from harness.process import mailbench_command

pytestmark = pytest.mark.integration


def test_a_short_calibration_gives_the_table_in_the_right_order(tmp_path: Path) -> None:
    done = subprocess.run(
        mailbench_command(
            "calibrate", "--seconds", "2", "--cases", "0ms,10ms,stall", "--users", "5",
            "--rate", "50", "--stall-every", "4", "--out", str(tmp_path),
        ),
        capture_output=True,
        text=True,
        timeout=150,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [folder] = tmp_path.glob("calibration-*")
    text = (folder / "calibration.md").read_text()
    assert "| case | model | samples | p50 | p99 | p99.9 | error p50 |" in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 3 * 3 and all(line in done.stdout for line in table)
    rows = json.loads((folder / "calibration.json").read_text())["rows"]
    p50 = {(r["case"], r["model"]): r["measured_us"]["50.0"] for r in rows}
    assert set(p50) == {
        (case, model)
        for case in ("0ms", "10ms", "stall")
        for model in ("closed", "open", "open, service time")
    }
    for model in ("closed", "open", "open, service time"):
        assert 0 < p50[("0ms", model)] < p50[("10ms", model)], model
        assert p50[("10ms", model)] >= 10_000, model
    assert all(r["samples"] > 0 and r["errors"] == 0 for r in rows), rows
    # The stall case ran a whole period (4 s), its one stall 2 s in, and knows its truth.
    stalls = [r for r in rows if r["case"] == "stall"]
    assert [r["stalls"] for r in stalls] == [1, 1, 1]
    assert all(1_000_000 < r["truth_us"]["99.9"] < 1_400_000 for r in stalls), stalls
    assert "stall, open model from intended start: p99.9 " in text
