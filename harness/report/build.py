"""``mailbench report``: ``report.md``, ``report.html`` and the charts, rebuilt from a
results folder alone.

``mailbench report RUN_DIR`` redraws every chart and writes both reports into the folder;
``mailbench report RUN_A RUN_B …`` compares runs side by side (see
:mod:`harness.report.comparison`). Nothing here reads anything but the folder.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from harness.report.charts import (
    SPECTRUM_ORDER,
    delivery_chart,
    gap_chart,
    save,
    spectrum_chart,
    timeline_chart,
)
from harness.report.comparison import build_comparison
from harness.report.html import write_html
from harness.report.markdown import render
from harness.report.sweep import sweep_chart
from harness.results.folder import Run, load_run


def draw_all(run: Run) -> dict[str, list[Path]]:
    """Every chart the folder's data allows, in reading order: ``{name: [png, svg]}``."""
    charts_dir = run.layout.charts
    drawn = {"gap": save(gap_chart(run), charts_dir, "gap")}
    present = {metric for (_mode, metric) in run.histograms}
    order = {m: i for i, m in enumerate(SPECTRUM_ORDER)}
    for metric in sorted(present, key=lambda m: (order.get(m, len(order)), m)):
        name = f"spectrum-{metric}"
        drawn[name] = save(spectrum_chart(run, metric), charts_dir, name)
    if "delivery" in present:
        drawn["delivery"] = save(delivery_chart(run), charts_dir, "delivery")
    if any(r.p99_us is not None for r in run.timeseries):
        drawn["timeline"] = save(timeline_chart(run), charts_dir, "timeline")
    if run.sweep:
        drawn["sweep"] = save(sweep_chart(run), charts_dir, "sweep")
    return drawn


def build_report(run_dir: Path) -> Path:
    """Redraw every chart and write ``report.md`` and ``report.html``; returns report.md."""
    run = load_run(run_dir)
    charts = draw_all(run)
    text = render(run, list(charts))
    run.layout.report.write_text(text)
    write_html(text, run.path, run.layout.report_html)
    return run.layout.report


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="one results folder: rebuild its charts, report.md and report.html; "
        "two or more: compare them side by side",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="where a comparison goes (default: results/compare-<timestamp>/)",
    )


def cli_main(args: argparse.Namespace) -> int:
    if len(args.runs) == 1:
        print(build_report(args.runs[0]))
        return 0
    out = args.out or Path("results") / dt.datetime.now().strftime("compare-%Y%m%d-%H%M%S")
    print(build_comparison(args.runs, out))
    return 0
