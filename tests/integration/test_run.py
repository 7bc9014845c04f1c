"""Short headless runs of the real harness: Locust, server, fake Mailgun, results folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.results.folder import METRICS, load_run

pytestmark = pytest.mark.integration


def mailbench_run(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("results")
    done = mailbench_run(
        out,
        "--modes",
        "direct,blocking",
        "--duration",
        "6",
        "--users",
        "12",
        "--latency",
        "fixed:0.05",
        "--locust-processes",
        "2",
        "--warmup",  # every request in the figures: they are compared with Locust's counts
        "0",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out / "latest"


def test_results_folder_parses(quick_run: Path) -> None:
    run = load_run(quick_run)
    assert run.modes == ["direct", "blocking"]
    assert run.manifest["config"]["latency"] == "fixed:0.05"
    assert run.manifest["git_commit"]
    for mode in run.modes:
        for metric in ("form", "send", "api"):
            row = run.row(mode, metric)
            assert row is not None and row.count > 0, (mode, metric)
            assert 0 < row.p50_us <= row.p99_us <= row.max_us
        assert (mode, "form") in run.histograms
    assert set(r.metric for r in run.summary) <= set(METRICS)
    for name in ("gap.png", "gap.svg"):
        assert (quick_run / "charts" / name).stat().st_size > 1000
    report = (quick_run / "report.md").read_text()
    assert "charts/gap.png" in report
    assert "| direct |" in report


def test_counts_match_the_ledger(quick_run: Path) -> None:
    run = load_run(quick_run)
    for accounted in run.accounting:
        mode, row = accounted.mode, accounted.counts
        assert row.accepted > 0
        assert row.lost == 0 and row.unexpected == 0, row
        assert row.delivered == row.accepted
        ledger = json.loads((quick_run / "raw" / mode / "ledger.json").read_text())
        assert len({e["idempotency_key"] for e in ledger}) == row.delivered
        send = run.row(mode, "send")
        assert send is not None
        # Every 2xx Locust saw is an accepted job; a reply still in flight when Locust's
        # stop timeout ends is accepted by the server but never seen by the generator.
        assert 0 < send.count <= row.accepted


def test_worker_histograms_merge_to_locust_counts(quick_run: Path) -> None:
    """With --processes 2 both workers' histograms reach the results: the µs histogram
    counts must equal Locust's own request counts, name by name."""
    for mode in ("direct", "blocking"):
        final = json.loads((quick_run / "raw" / mode / "locust-final.json").read_text())
        run = load_run(quick_run)
        for stats in final:
            successes = stats["num_requests"] - stats["num_failures"]
            assert run.histograms[(mode, stats["name"])].get_total_count() == successes


def test_blocking_stalls_the_form_page(quick_run: Path) -> None:
    run = load_run(quick_run)
    direct, blocking = run.row("direct", "form"), run.row("blocking", "form")
    assert direct is not None and blocking is not None
    # One blocking 50 ms API call stalls every request on the process.
    assert blocking.p99_us > 20_000 > direct.p50_us


def test_report_rebuilds_from_the_folder_alone(quick_run: Path) -> None:
    summary = (quick_run / "summary.csv").read_text()
    (quick_run / "charts" / "gap.png").unlink()
    done = subprocess.run(
        [sys.executable, "-m", "harness.cli", "report", str(quick_run)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (quick_run / "charts" / "gap.png").is_file()
    assert (quick_run / "summary.csv").read_text() == summary


def test_unknown_mode_is_one_clear_sentence(tmp_path: Path) -> None:
    done = mailbench_run(tmp_path, "--modes", "carrier-pigeon")
    assert done.returncode == 2
    assert "unknown mode(s) carrier-pigeon" in done.stderr
    assert "Traceback" not in done.stderr
