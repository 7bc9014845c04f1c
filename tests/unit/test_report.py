"""report.md, report.html and comparisons, from results folders alone.

The committed sample run is the reference: rebuilding its report must give the committed
tables and chart data again, byte for byte.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from test_charts import sweep_rows, synthetic_run

from harness.cli import main
from harness.report import markdown
from harness.report.build import build_report
from harness.report.comparison import run_labels
from harness.report.html import to_html
from harness.results.folder import Run, load_run

SAMPLE = Path(__file__).resolve().parents[2] / "results" / "sample"


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    copy = tmp_path / "sample"
    shutil.copytree(SAMPLE, copy)
    return copy


def svg_texts(path: Path) -> list[str]:
    """The words a chart shows: tick labels, legend entries (with n, max), captions."""
    return re.findall(r"<text[^>]*>([^<]*)</text>", path.read_text())


def test_report_of_the_sample_reproduces_the_committed_one(sample: Path) -> None:
    committed = {p.name: p.read_bytes() for p in sample.glob("*.csv")}
    build_report(sample)
    assert (sample / "report.md").read_text() == (SAMPLE / "report.md").read_text()
    assert {p.name: p.read_bytes() for p in sample.glob("*.csv")} == committed
    assert sorted(p.name for p in (sample / "charts").iterdir()) == sorted(
        p.name for p in (SAMPLE / "charts").iterdir()
    )
    for svg in (SAMPLE / "charts").glob("*.svg"):
        assert svg_texts(sample / "charts" / svg.name) == svg_texts(svg), svg.name
    html = (sample / "report.html").read_text()
    tables = re.findall(r"<table>.*?</table>", html, re.DOTALL)
    assert tables == re.findall(
        r"<table>.*?</table>", (SAMPLE / "report.html").read_text(), re.DOTALL
    )


def test_a_changed_figure_changes_the_report(sample: Path) -> None:
    """The comparison above can fail: one p50 edited in summary.csv shows in report.md."""
    rows = list(csv.DictReader((sample / "summary.csv").open()))
    rows[0]["p50_us"] = str(int(rows[0]["p50_us"]) * 3)
    with (sample / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    text = markdown.render(load_run(sample), ["gap"])
    assert text != (SAMPLE / "report.md").read_text()


def test_headline_names_the_fastest_queue_and_the_factor(tmp_path: Path) -> None:
    run = synthetic_run(tmp_path, {"direct": (150, 760_000), "redis": (160, 400)})
    send = {r.mode: r.p50_us for r in run.summary if r.metric == "send"}
    factor = send["direct"] / send["redis"]
    line = markdown.headline(run)
    assert line.startswith("Queued with Redis, POST /send answered in ")
    assert f"{factor:,.0f}× faster than calling Mailgun in the request" in line


def test_headline_without_a_queue_gives_each_gap(tmp_path: Path) -> None:
    run = synthetic_run(tmp_path, {"direct": (150, 760_000), "blocking": (9_000, 800_000)})
    line = markdown.headline(run)
    assert line.startswith("POST /send, direct: POST /send p50 ")
    assert "blocking: " in line and "the form page" in line


def test_a_clean_run_says_so(tmp_path: Path) -> None:
    run = synthetic_run(tmp_path, n=800)
    assert markdown.warnings(run) == []
    assert "Nothing was lost" in markdown.render(run, [])


def test_what_to_watch_names_every_problem(tmp_path: Path) -> None:
    run = synthetic_run(tmp_path, n=396)  # 99 sends per mode
    run.manifest["config"]["modes"] += ["postgres", "rabbitmq"]
    run.manifest["modes"]["postgres"] = {"skipped": "broker unavailable"}
    run.manifest["modes"]["redis"]["notes"] = ["generator-bound: the CPU reached 99%"]
    redis = run.accounting[2]
    counts = replace(redis.counts, lost=3, duplicates=2, dead_lettered=1, unexpected=1)
    run.accounting[2] = replace(redis, counts=counts)
    run.summary[1] = replace(run.summary[1], errors=4)
    text = "\n".join(markdown.warnings(run))
    assert "**postgres** was skipped: broker unavailable." in text
    assert "**rabbitmq** was planned but did not run" in text
    assert "generator-bound" in text
    assert "**redis**: 3 accepted emails were never delivered (lost)" in text
    assert "**redis**: 2 duplicate deliveries" in text
    assert "**redis**: 1 emails dead-lettered." in text
    assert "**redis**: 1 deliveries of no send the load generator made." in text
    assert "4 of " in text and "`send` requests failed" in text
    assert "fewer than 100 samples in direct (99), blocking (99), redis (99)" in text
    assert "| redis | 99 | 99 | 2 | 1 | 3 | 1 | 0 | **FAILED** |" in markdown.accounting_table(run)


def test_a_load_sweep_gets_its_table(tmp_path: Path) -> None:
    run = synthetic_run(tmp_path)
    run.sweep = sweep_rows("redis", 2)
    text = markdown.render(run, ["gap", "sweep"])
    assert "## Load sweep" in text and "![sweep](charts/sweep.png)" in text
    assert "| redis | 100 | 60 | 0.0% | 200 ms | 400 ms | **knee** |" in text


def test_tables_show_human_units(tmp_path: Path) -> None:
    run = synthetic_run(tmp_path)
    table = markdown.summary_table(run)
    assert "| mode | metric | count | errors | per s | mean | p50 |" in table
    assert " µs |" in table and " ms |" in table
    assert "_us" not in table


def test_html_is_one_self_contained_file(sample: Path) -> None:
    html = to_html((sample / "report.md").read_text(), sample)
    assert html.count("<svg") == len(re.findall(r"^!\[", (sample / "report.md").read_text(), re.M))
    assert not re.search(r'(src|href)="(https?:|//|[^#"d])', html)  # no file or URL outside
    assert "<script" not in html
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids)) > 0  # ids of several inlined SVGs never clash
    assert html.count("<table>") == (sample / "report.md").read_text().count("\n|---")


def test_runs_are_labelled_by_what_differs(tmp_path: Path) -> None:
    a, b = synthetic_run(tmp_path / "a"), synthetic_run(tmp_path / "b")
    b.manifest["config"]["latency"] = "fixed:0.2"
    assert run_labels([a, b]) == ["latency uniform:0.5,1.0", "latency fixed:0.2"]
    b.manifest["config"]["latency"] = "uniform:0.5,1.0"
    b.manifest["run_id"] = "20260101-000001"
    assert run_labels([a, b]) == ["run 20260101-000000", "run 20260101-000001"]


def test_report_command_compares_two_runs(sample: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(sample, other)
    manifest = (other / "manifest.json").read_text()
    (other / "manifest.json").write_text(manifest.replace('"seed": 1', '"seed": 2'))
    out = tmp_path / "compare"
    assert main(["report", str(sample), str(other), "--out", str(out)]) == 0
    text = (out / "comparison.md").read_text()
    assert "| A | seed 1 |" in text and "| B | seed 2 |" in text
    assert "![compare-gap](charts/compare-gap.png)" in text
    for name in ("compare-gap", "compare-latency"):
        assert (out / "charts" / f"{name}.png").stat().st_size > 10_000
    assert "<svg" in (out / "comparison.html").read_text()
    run: Run = load_run(sample)
    for mode in run.modes:
        gap = run.gap(mode)
        if gap is not None:
            assert f"| {mode} | {markdown.times(gap)} | {markdown.times(gap)} |" in text


def test_readme_embeds_the_sample_gap_chart_and_quotes_its_headline() -> None:
    readme = (SAMPLE.parents[1] / "README.md").read_text()
    assert "](results/sample/charts/gap.png)" in readme
    assert (SAMPLE / "charts" / "gap.png").is_file()
    headline = markdown.headline(load_run(SAMPLE))  # "Queued with X, … in 2.57 ms (p50) — 284× …"
    quoted = re.search(
        r"Queued with (\w+), POST /send answered in ([^ ]+ \w+) \(p50\) — (\S+)", headline
    )
    assert quoted is not None
    for part in quoted.groups():
        assert part in readme.replace("\n", " "), part


def test_framework_modes_get_their_table_beside_the_reference_queue(tmp_path: Path) -> None:
    shape = {"direct": (150, 760_000), "redis": (150, 400), "rq": (150, 9_000)}
    run = synthetic_run(tmp_path, shape)
    rq = run.accounting[2]
    run.accounting[2] = replace(rq, counts=replace(rq.counts, delivered=90, lost=10))
    chaos = tmp_path / "raw" / "rq" / "chaos-events.json"
    chaos.parent.mkdir(parents=True)
    kinds = ["kill"] * 5 + ["restart"]
    chaos.write_text(json.dumps([{"at_s": 1.0, "kind": k, "what": ""} for k in kinds]))
    section = markdown.render(run, []).split("## Task-queue frameworks")[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    # The framework first, then the reference queue; the in-request mode is not compared.
    assert [line.split(" | ")[:2] for line in lines[1:]] == [
        ["| rq", "default"],
        ["| redis", "reference queue"],
    ]
    assert "| **10** |" in lines[1] and lines[1].endswith("| 5 kills, 1 broker restart(s) |")
    assert lines[2].endswith("| – |")


def test_runs_without_a_framework_have_no_framework_table(tmp_path: Path) -> None:
    assert "Task-queue frameworks" not in markdown.render(synthetic_run(tmp_path), [])


def test_headline_names_a_real_queue_before_a_faster_shortcut(tmp_path: Path) -> None:
    shape = {"direct": (150, 760_000), "redis": (160, 900), "background": (150, 300)}
    line = markdown.headline(synthetic_run(tmp_path, shape))
    assert line.startswith("Queued with Redis, POST /send answered in "), line
    del shape["redis"]
    alone = markdown.headline(synthetic_run(tmp_path / "b", shape))
    assert alone.startswith("Queued with an in-process background task"), alone
