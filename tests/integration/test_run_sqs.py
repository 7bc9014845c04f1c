"""The sqs mode end to end in the quick profile, against the local SQS server (moto)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.results.accounting import reconcile
from harness.results.collect import client_sends, dead_lettered_recipients
from harness.results.folder import load_run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_a_quick_run_of_sqs_loses_nothing(sqs_url: str, tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = {**os.environ, "SQS_URL": sqs_url, "CI": "true"}
    done = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", "--modes", "sqs", "--profile", "quick",
         "--out", str(out)],
        capture_output=True, text=True, timeout=280, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = load_run(out / "latest")
    row = run.accounting_of("sqs")
    assert row is not None and row.accepted > 0
    assert (row.lost, row.unexpected, row.duplicates) == (0, 0, 0), row
    assert row.delivered == row.accepted
    send, api = run.row("sqs", "send"), run.row("sqs", "api")
    assert send is not None and api is not None and send.p50_us < api.p50_us
    assert "moto's, not AWS's" in (out / "latest" / "report.md").read_text()

    # Negative control: the same sends, one planted that no worker ever delivered.
    raw = out / "latest" / "raw" / "sqs"
    accepted, failed = client_sends(raw)
    ledger = json.loads((raw / "ledger.json").read_text())
    planted = [*accepted, ("never-delivered@example.com", accepted[0][1])]
    counts, _ = reconcile(planted, ledger, dead_lettered_recipients(raw), failed)
    assert counts.lost == 1
