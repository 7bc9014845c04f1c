"""Every report states the generator's own floor, measured at the run's start, and names
the form figures too close to it to be the server's."""

from __future__ import annotations

from pathlib import Path

from harness.report import markdown
from harness.results.accounting import Accounting
from harness.results.folder import ModeResult, load_run, write_manifest, write_results
from servers.metrics import new_histogram, record_us


def folder_with(tmp_path: Path, floor: dict[str, object] | None) -> Path:
    results = []
    for mode, form_us in (("direct", 1_000), ("redis", 5_000)):
        histograms = {"form": new_histogram(), "send": new_histogram()}
        for _ in range(200):
            record_us(histograms["form"], form_us)
            record_us(histograms["send"], 3 * form_us)
        results.append(ModeResult(mode, 10.0, histograms, {}, Accounting(200, 200, 0, 0, 0, 0)))
    manifest: dict[str, object] = {"run_id": "r", "config": {"modes": ["direct", "redis"]}}
    if floor is not None:
        manifest["generator_floor_us"] = floor
    write_manifest(tmp_path, manifest)
    write_results(tmp_path, results)
    return tmp_path


def test_the_report_prints_the_floor_and_what_it_dominates(tmp_path: Path) -> None:
    floor = {"p50": 400, "p99": 2_100, "samples": 900, "seconds": 2.0}
    text = markdown.render(load_run(folder_with(tmp_path, floor)), [])
    expected = (
        "The generator adds ~400 µs (p50; p99 2.1 ms: its floor, measured against a 0 ms "
        "page under this run's load at its start, see `mailbench calibrate`); form figures "
        "within 3× of it are dominated by the generator — here direct (1 ms)."
    )
    assert expected in text
    # Near the caption, before the first table.
    assert text.index("*load:") < text.index(expected) < text.index("## The gap")


def test_without_a_floor_the_report_says_nothing_of_it(tmp_path: Path) -> None:
    text = markdown.render(load_run(folder_with(tmp_path, None)), [])
    assert "The generator adds" not in text
