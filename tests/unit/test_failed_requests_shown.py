"""A mode whose requests mostly failed is FAILED where readers look: report.md (the
accounting table's verdict and "What to watch") and the CI gate, which fails such a run
even against a baseline that failed as badly."""

from __future__ import annotations

from pathlib import Path

from test_failed_requests import dead_target_folder, mode_result

from harness.cli import main as mailbench
from harness.gate.compare import compare_runs, load_runs
from harness.report import markdown
from harness.results.folder import load_run, write_manifest, write_results


def test_report_says_failed_and_why(tmp_path: Path) -> None:
    run = load_run(dead_target_folder(tmp_path / "run"))
    text = markdown.render(run, [])
    row = markdown.accounting_table(run).splitlines()[-1]
    assert row.startswith("| target |") and row.endswith(
        "| **FAILED** (95 of 120 requests failed) |"
    )
    watch = text.split("## What to watch", 1)[1].split("\n## ", 1)[0]
    assert (
        "- **target**: 95 of 120 form and send requests failed (79%): its figures are those "
        "of failures, not of the server; accounting **FAILED**."
    ) in watch, watch
    assert "Nothing was lost" not in text


def test_the_gate_fails_a_run_that_mostly_failed_even_against_itself(tmp_path: Path) -> None:
    folder = dead_target_folder(tmp_path / "run")
    result = compare_runs(load_runs([folder]), load_runs([folder]))
    row = next(r for r in result.rows if r.metric == "failed requests")
    assert row.verdict == "regression" and result.exit_code == 1, result.markdown()
    assert row.note == "accounting FAILED: 95 of 120 requests failed"
    assert mailbench(["compare", str(folder), str(folder)]) == 1


def test_a_run_with_a_few_failures_is_not_failed_by_them(tmp_path: Path) -> None:
    result = mode_result("target", {"form": 90, "send": 10}, {"form": 10})
    folder = tmp_path / "run"
    write_manifest(folder, {"run_id": "run", "config": {}})
    write_results(folder, [result])
    comparison = compare_runs(load_runs([folder]), load_runs([folder]))
    assert comparison.exit_code == 0, comparison.markdown()
    assert load_run(folder).accounting_of("target") == result.accounting
    assert result.accounting.verdict == "ok"
