"""Several Locust processes: every process's last sends, histograms and lists reach the
results, at the default API latency (0.5-1 s), where a worker is still finishing its
users' visits for seconds after the master decided to quit."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from harness.process import mailbench_command
from harness.results.accounting import recipient_of
from harness.results.collect import client_sends
from harness.results.folder import load_run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("results")
    done = subprocess.run(
        mailbench_command(
            "run", "--modes", "direct", "--scenario", "sender", "--users", "20",
            "--duration", "10", "--locust-procs", "2", "--out", str(out),
        ),
        capture_output=True, text=True, timeout=240, env={**os.environ, "CI": "true"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out / "latest"


def test_nothing_is_lost_or_unexpected(two_procs: Path) -> None:
    run = load_run(two_procs)
    [accounted] = run.accounting
    counts = accounted.counts
    assert counts.accepted > 50, counts
    assert (counts.lost, counts.unexpected, counts.duplicates) == (0, 0, 0), counts
    # Closed users finish their visit within the stop timeout: every reply was seen.
    assert counts.unacknowledged == 0, counts
    assert counts.delivered == counts.accepted


def test_every_accepted_send_is_in_the_results(two_procs: Path) -> None:
    raw = two_procs / "raw" / "direct"
    ledger = json.loads((raw / "ledger.json").read_text())
    accepted, _attempted = client_sends(raw)
    # In direct mode the server accepts a send exactly when the API did: the ledger
    # holds every send the server accepted, and each must be one the results hold.
    delivered = {recipient_of(entry) for entry in ledger}
    assert delivered == {recipient.casefold() for recipient, _ in accepted}
    assert len(accepted) == len(ledger)


def test_each_worker_process_wrote_its_own_file(two_procs: Path) -> None:
    raw = two_procs / "raw" / "direct"
    journals = sorted(raw.glob("locust-hdr-*.jsonl"))
    assert len(journals) >= 2, [p.name for p in raw.iterdir()]


def test_the_servers_own_time_is_beside_the_clients(two_procs: Path) -> None:
    run = load_run(two_procs)
    for metric in ("form", "send"):
        client, server = run.row("direct", metric), run.row("direct", f"{metric}_server")
        assert client is not None and server is not None, metric
        # Every answer of the reference server carries Server-Timing, and the handler's
        # own time is part of the client's.
        assert server.count == client.count
        assert 0 < server.p50_us < client.p50_us
