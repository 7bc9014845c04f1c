"""A mode in which most requests failed measured its failures, not its server: its
accounting is FAILED — in report.md, the chaos table and exit code, ``mailbench run``'s
warning and the CI gate — with the reason next to it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.results.accounting import Accounting
from harness.results.collect import collect_mode
from harness.results.folder import ModeResult, load_run, write_manifest, write_results
from harness.run.chaos import accounting_table as chaos_table
from harness.run.cli import warn_unsound
from servers.metrics import Recorder, new_histogram, record_us

NOTHING_SENT = Accounting(0, 0, 0, 0, 0, 0)


def mode_result(name: str, answered: dict[str, int], failed: dict[str, int]) -> ModeResult:
    """A mode whose form and send requests were ``answered`` (at 1 ms) or ``failed``,
    counted into its accounting as ``collect_mode`` counts them."""
    histograms = {}
    for metric, count in answered.items():
        histograms[metric] = new_histogram()
        for _ in range(count):
            record_us(histograms[metric], 1000)
    sends = answered.get("send", 0)
    accounting = Accounting(sends, sends, 0, 0, 0, 0).with_requests(answered, failed)
    return ModeResult(name, 10.0, histograms, failed, accounting)


def dead_target_folder(folder: Path) -> Path:
    """What a run against a server that was down looks like: nearly every request failed."""
    result = mode_result("target", {"form": 20, "send": 5}, {"form": 80, "send": 15})
    write_manifest(folder, {"run_id": folder.name, "config": {"modes": ["target"]},
                            "modes": {"target": {"notes": []}}})  # fmt: skip
    write_results(folder, [result])
    return folder


def test_the_share_of_failed_requests_is_judged() -> None:
    half = NOTHING_SENT.with_requests({"form": 50}, {"form": 50})
    most = NOTHING_SENT.with_requests({"form": 49, "send": 0}, {"form": 50, "send": 1})
    assert (half.requests, half.failed_requests, half.sound, half.verdict) == (100, 50, True, "ok")
    assert (most.requests, most.failed_requests) == (100, 51)
    assert (most.sound, most.verdict, most.reasons) == (
        False,
        "FAILED",
        ["51 of 100 requests failed"],
    )
    # Only the load generator's own requests count, and a mode with none is not judged.
    other = NOTHING_SENT.with_requests({"api": 1}, {"api": 99, "render": 3})
    assert (other.requests, other.sound) == (0, True)
    assert NOTHING_SENT.sound and NOTHING_SENT.reasons == []
    lost = Accounting(10, 9, 0, 0, 1, 0)
    assert (lost + most).reasons == ["1 lost", "51 of 100 requests failed"]


def test_collect_counts_the_requests_as_the_summary_does(tmp_path: Path) -> None:
    """What Locust wrote of a run against a dead target: every request failed."""
    recorder = Recorder()
    recorder.record("form", 0.001)
    locust = {"histograms": recorder.encoded(), "errors": {"form": 55, "send": 9}}
    (tmp_path / "locust-hdr.json").write_text(json.dumps(locust))
    result = collect_mode("target", tmp_path, 10.0, [], [])
    counts = result.accounting
    assert (counts.requests, counts.failed_requests, counts.verdict) == (65, 64, "FAILED")
    rows = {row.metric: row for row in result.summary_rows()}
    assert counts.requests == sum(rows[m].count + rows[m].errors for m in ("form", "send"))


def test_the_counts_are_kept_in_accounting_csv(tmp_path: Path) -> None:
    folder = dead_target_folder(tmp_path / "run")
    header = (folder / "accounting.csv").read_text().splitlines()[0]
    assert header.endswith(",unacknowledged,requests,failed_requests")
    counts = load_run(folder).accounting_of("target")
    assert counts is not None and (counts.requests, counts.failed_requests) == (120, 95)
    assert counts.verdict == "FAILED"


def test_chaos_and_the_run_warning_say_it_too(capsys: pytest.CaptureFixture[str]) -> None:
    results = [mode_result("redis", {"form": 30, "send": 40}, {"send": 80})]
    assert chaos_table(results).splitlines()[-1].endswith("| 150 | 80 | FAILED |")
    warn_unsound(results)
    assert capsys.readouterr().err == (
        "WARNING: redis: accounting FAILED, lost=0 unexpected=0; 80 of 150 requests failed\n"
    )
