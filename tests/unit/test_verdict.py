"""One verdict on a mode's accounting, the same wherever it is shown: a lost email and an
unexpected delivery fail, a duplicate delivery is named but passes — in report.md's
table, the comparison of runs, the chaos table (and its exit code) and the CI gate."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from test_compare import Mode, write_run

from harness.gate.compare import compare_runs, load_runs
from harness.report import comparison, markdown
from harness.results.accounting import Accounting
from harness.results.folder import ModeResult, load_run
from harness.run.chaos import accounting_table as chaos_table
from harness.run.cli import warn_unsound

CLEAN = Accounting(accepted=10, delivered=10, duplicates=0, dead_lettered=0, lost=0, unexpected=0)
PLANTED = {
    "lost": (replace(CLEAN, delivered=9, lost=1), "FAILED"),
    "unexpected": (replace(CLEAN, unexpected=1), "FAILED"),
    "duplicates": (replace(CLEAN, duplicates=1), "duplicates"),
}
CASES = [(name, *planted) for name, planted in PLANTED.items()]


def test_the_verdict_itself() -> None:
    assert (CLEAN.sound, CLEAN.verdict) == (True, "ok")
    assert [(c.sound, c.verdict) for c, _ in PLANTED.values()] == [
        (False, "FAILED"),
        (False, "FAILED"),
        (True, "duplicates"),
    ]
    both = PLANTED["lost"][0] + PLANTED["duplicates"][0]
    assert (both.lost, both.duplicates, both.accepted, both.verdict) == (1, 1, 20, "FAILED")


@pytest.mark.parametrize(("planted", "counts", "label"), CASES)
def test_report_and_comparison_tables(
    tmp_path: Path, planted: str, counts: Accounting, label: str
) -> None:
    folder = write_run(tmp_path / "run", Mode())
    run = load_run(folder)
    run.accounting = [replace(run.accounting[0], counts=counts)]
    cell = f"**{label}**" if label == "FAILED" else label
    row = markdown.accounting_table(run).splitlines()[-1]
    assert row.startswith("| sqlite |") and row.endswith(f"| {cell} |"), row
    text = comparison.render([run, run], ["A", "B"], [folder, folder], [])
    detail = "1" if planted == "duplicates" else f"1 {planted}"
    assert f"| sqlite | {cell} ({detail}) | {cell} ({detail}) |" in text, text
    if label == "FAILED":
        assert "Nothing was lost" not in markdown.render(run, [])


@pytest.mark.parametrize(("planted", "counts", "label"), CASES)
def test_chaos_table_and_warning(
    capsys: pytest.CaptureFixture[str], planted: str, counts: Accounting, label: str
) -> None:
    results = [
        ModeResult("redis", 1.0, {}, {}, CLEAN),
        ModeResult("sqlite", 1.0, {}, {}, counts),
    ]
    lines = chaos_table(results).splitlines()
    assert lines[0].endswith("| verdict |")
    assert lines[2].startswith("| redis |") and lines[2].endswith("| ok |")
    assert lines[3].startswith("| sqlite |") and lines[3].endswith(f"| {label} |")
    # chaos exits 1 unless every mode is sound; ``mailbench run`` warns on the same test.
    warn_unsound(results)
    warning = capsys.readouterr().err
    if label == "FAILED":
        assert warning.startswith("WARNING: sqlite: accounting FAILED, lost=")
        assert f"{planted}=1" in warning and "redis" not in warning
    else:
        assert warning == ""


@pytest.mark.parametrize(("planted", "counts", "label"), CASES)
def test_the_gate(tmp_path: Path, planted: str, counts: Accounting, label: str) -> None:
    baseline = write_run(tmp_path / "base", Mode(), seed=1)
    current = write_run(tmp_path / "cur", Mode(**{planted: 1}), seed=1)
    assert load_run(current).accounting_of("sqlite") == replace(
        counts, accepted=300, delivered=300 - counts.lost
    )
    result = compare_runs(load_runs([baseline]), load_runs([current]))
    row = next(r for r in result.rows if r.mode == "sqlite" and r.metric == planted)
    assert (row.baseline, row.current) == (0, 1)
    assert row.note == f"accounting {label}"
    others = [r for r in result.rows if r.rule == "must be 0" and r.metric != planted]
    assert [r.verdict for r in others] == ["ok"] * len(others) and others
    if label == "FAILED":
        assert row.verdict == "regression" and result.exit_code == 1
        assert f"| sqlite {planted} | 0 | 1 | – | **REGRESSION** (accounting FAILED) |" in (
            result.markdown()
        )
    else:
        assert row.verdict == "info" and result.exit_code == 0, result.markdown()
        assert "| sqlite duplicates | 0 | 1 | – | info (accounting duplicates) |" in (
            result.markdown()
        )
