"""The open model against a mode that cannot keep up: blocking, one 0.2 s call at a time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.results.folder import load_run

pytestmark = pytest.mark.integration


def test_open_model_reports_latency_from_intended_start(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", "--modes", "blocking", "--scenario",
         "sender", "--rate", "10", "--arrivals", "constant", "--max-in-flight", "3",
         "--latency", "fixed:0.2", "--duration", "10", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    run = load_run(tmp_path / "latest")
    assert run.manifest["config"]["load_model"] == "open, 10/s constant arrivals (sender)"
    service, intended = run.row("blocking", "send"), run.row("blocking", "send_intended")
    assert service is not None and intended is not None
    # 10 visits/s offered, at most 5/s servable (two requests of 0.2 s... one blocking call
    # each): the schedule falls behind and the latency from intended start shows it.
    assert intended.p99_us > 2 * service.p99_us
    generator = run.manifest["modes"]["blocking"]["generator"]
    assert generator["late_starts"] > 0
    notes = " ".join(run.manifest["modes"]["blocking"]["notes"])
    assert "cannot keep up" in notes
    assert "send_intended" in {r.metric for r in run.timeseries}
