"""The warm-up: a queued mode's cold start stays out of its summary, not out of its
timeline."""

from __future__ import annotations

import os
import statistics
import subprocess
from pathlib import Path

import pytest

from harness.process import mailbench_command
from harness.results.folder import load_run

pytestmark = pytest.mark.integration


def test_the_summary_is_the_steady_state(tmp_path: Path) -> None:
    done = subprocess.run(
        mailbench_command("run", "--modes", "sqlite", "--scenario", "sender", "--users", "50",
                          "--duration", "10", "--warmup", "3",
                          "--out", str(tmp_path)),
        capture_output=True, text=True, timeout=240, env={**os.environ, "CI": "true"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = load_run(tmp_path / "latest")
    assert run.manifest["config"]["warmup_s"] == 3
    send = run.row("sqlite", "send")
    assert send is not None and send.count > 50
    rows = [r for r in run.timeseries if r.mode == "sqlite" and r.metric == "send"]
    steady = [r.p99_us for r in rows if r.second >= 3 and r.p99_us is not None]
    assert len(steady) >= 5
    # The cold start (the first connections, the first inserts) would dominate the tail.
    assert send.p99_us <= 2 * statistics.median(steady), (send, rows)
    # Seconds count from the first request, warm-up included in the timeline.
    assert min(r.second for r in rows) == 0
    assert sum(r.requests or 0 for r in rows if r.second < 3) > 0
    # A request belongs to the warm-up when it was sent in it; the timeline counts it in
    # the second it was answered: only the few in flight at 3 s are in both.
    answered_after = sum(r.requests or 0 for r in rows if r.second >= 3)
    assert 0 <= answered_after - send.count <= 50  # at most one per user
