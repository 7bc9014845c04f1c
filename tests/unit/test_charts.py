"""The chart style: units, log axes, stable colours, legends off the data, the spectrum's
arithmetic, and files that do not change when the data does not."""

from __future__ import annotations

import random
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from PIL import Image

from harness.report import charts
from harness.report.build import draw_all
from harness.results.accounting import Accounting
from harness.results.folder import Run
from harness.results.rows import AccountingRow, SummaryRow, SweepRow, TimeseriesRow
from servers.metrics import Summary, new_histogram, record_us
from servers.modes import MODES

# (form p50, send p50) in µs per mode: the shape of a real run, in-request modes slow.
SHAPE = {"direct": (150, 750_000), "blocking": (40_000, 800_000), "redis": (160, 420)}


def synthetic_run(path: Path, shape: dict[str, tuple[int, int]] = SHAPE, n: int = 400) -> Run:
    """A run held in memory (the folder only receives charts): lognormal latencies around
    the given medians, per-second rows, and queue depth rows with blank fields, as
    ``timeseries.csv`` has them."""
    rng = random.Random(7)
    histograms: dict[tuple[str, str], Any] = {}
    summary, accounting, timeseries = [], [], []
    for mode, (form, send) in shape.items():
        medians = {"form": form, "send": send, "api": 750_000, "delivery": max(send, 760_000)}
        for metric, median in medians.items():
            h = histograms[(mode, metric)] = new_histogram()
            for _ in range(n if metric == "form" else n // 4):
                record_us(h, median * rng.lognormvariate(0, 0.5))
            counted = Summary.of(h)
            summary.append(
                SummaryRow(mode, metric, errors=0, rate_per_s=counted.count / 10, **asdict(counted))
            )
        accounting.append(AccountingRow(mode, Accounting(n // 4, n // 4, 0, 0, 0, 0)))
        for second in range(10):
            for metric in ("form", "send"):
                values = {"requests": 40, "errors": 0, "p50_us": form * 2, "p99_us": form * 9}
                timeseries.append(TimeseriesRow(mode, second, metric, **values))
            if mode == "redis":
                timeseries.append(TimeseriesRow(mode, second, "queue", queue_depth=second % 3))
    config = {"load_model": "closed, 30 users (mixed)", "duration_s": 10.0}
    manifest = {
        "run_id": "20260101-000000",
        "git_commit": "abc123def456",
        "started_at": "2026-01-01T00:00:00+00:00",
        "finished_at": "2026-01-01T00:01:00+00:00",
        "machine": {"cores": 2, "memory_gib": 4.0, "os": "Debian GNU/Linux 12"},
        "config": {**config, "latency": "uniform:0.5,1.0", "modes": list(shape)},
        "modes": {m: {"duration_s": 10.0, "notes": []} for m in shape},
    }
    return Run(path, manifest, summary, accounting, timeseries, histograms)


@pytest.fixture
def run(tmp_path: Path) -> Run:
    return synthetic_run(tmp_path)


@pytest.mark.parametrize(
    ("micros", "text"),
    [
        (0, "0"),
        (150, "150 µs"),
        (1_500, "1.5 ms"),
        (999_000, "999 ms"),
        (999_999, "1 s"),
        (2_500_000, "2.5 s"),
    ],
)
def test_times_read_in_the_unit_that_fits(micros: float, text: str) -> None:
    assert charts.format_us(micros) == text


def test_axis_limits_are_labelled_ticks() -> None:
    assert charts.time_limits([150, 800_000]) == (100, 1_000_000)  # decades apart: decades
    assert charts.time_limits([1_200, 90_000]) == (1_000, 100_000)  # 2 decades: 1-2-5
    assert charts.time_limits([520_000, 990_000]) == (500_000, 1_500_000)  # close: finer


def test_spectrum_runs_from_zero_to_the_max_on_an_inverse_tail_axis() -> None:
    histogram = new_histogram()
    for value in range(1, 1001):
        record_us(histogram, value)
    xs, ys = charts.spectrum_points(histogram)
    assert xs[0] == 1.0 and ys[0] == 1  # 0%: the fastest request
    assert xs[-1] == 1000 and ys[-1] == 1000  # the last point is the max, at x = count
    assert ys == sorted(ys)
    at = dict(zip(xs, ys, strict=False))
    assert at[10.0] == pytest.approx(900, abs=1)  # x = 10 is p90
    assert at[100.0] == pytest.approx(990, abs=1)  # x = 100 is p99


def test_cdf_reaches_everything_at_the_max() -> None:
    histogram = new_histogram()
    for value in (100, 200, 200, 400):
        record_us(histogram, value)
    xs, ys = charts.cdf_points(histogram)
    assert xs == [100, 200, 400]
    assert ys == [0.25, 0.75, 1.0]


def test_each_mode_keeps_its_colour_and_each_metric_its_colour(run: Run) -> None:
    spectrum = charts.spectrum_chart(run, "send")
    lines = [line for line in spectrum.axes[0].get_lines() if line.get_linestyle() != "None"]
    assert [line.get_color() for line in lines] == [MODES[m].colour for m in SHAPE]
    gap = charts.gap_chart(run)
    bar_colours = {to_hex(p.get_facecolor()).upper() for p in gap.axes[0].patches}
    assert bar_colours == {charts.METRIC_COLOURS[m] for m in ("form", "send", "api")}


OKABE_ITO = {"#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7",
             "#999999", "#000000"}  # fmt: skip
TOL_MUTED = {
    "#CC6677",
    "#332288",
    "#DDCC77",
    "#117733",
    "#88CCEE",
    "#882255",
    "#44AA99",
    "#999933",
    "#AA4499",
}


def test_palette_is_okabe_ito_one_colour_per_mode_and_the_same_in_every_chart(run: Run) -> None:
    # mailbench's own modes and the metrics: Okabe-Ito, one colour each. A framework's
    # two configurations share one colour of Paul Tol's muted palette (their line styles
    # differ), one per framework and broker.
    mode_colours = {name: mode.colour for name, mode in MODES.items()}
    own = {name: colour for name, colour in mode_colours.items() if not MODES[name].framework}
    for palette in (own, charts.METRIC_COLOURS):
        assert set(palette.values()) <= OKABE_ITO
        assert len(set(palette.values())) == len(palette)
    frameworks = {
        name.removesuffix("-reliable"): colour
        for name, colour in mode_colours.items()
        if MODES[name].framework
    }
    assert set(frameworks.values()) <= TOL_MUTED
    assert len(set(frameworks.values())) == len(frameworks)
    figures = [charts.spectrum_chart(run, "form"), charts.delivery_chart(run)]
    figures.append(charts.timeline_chart(run))
    for figure in figures:
        handles = figure.legends[0].legend_handles
        texts = [t.get_text().split(" ")[0] for t in figure.legends[0].get_texts()]
        for mode, handle in zip(texts, handles, strict=True):
            if mode in mode_colours:
                assert handle.get_color() == mode_colours[mode]  # type: ignore[union-attr]


def all_figures(run: Run) -> dict[str, Figure]:
    return {
        "gap": charts.gap_chart(run),
        "spectrum": charts.spectrum_chart(run, "form"),
        "delivery": charts.delivery_chart(run),
        "timeline": charts.timeline_chart(run),
    }


def test_legends_sit_outside_every_plot_and_latency_axes_are_log(run: Run) -> None:
    for name, figure in all_figures(run).items():
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
        (legend,) = figure.legends
        box = legend.get_window_extent(renderer)
        for ax in figure.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), name
        assert "log" in (figure.axes[0].get_xscale(), figure.axes[0].get_yscale()), name
        assert charts.caption(run) in figure.get_supxlabel().replace("\n", " "), name


def test_timeline_adds_the_queue_depth_when_it_was_sampled(run: Run) -> None:
    assert len(charts.timeline_chart(run).axes) == 3
    run.timeseries = [r for r in run.timeseries if r.metric != "queue"]
    assert len(charts.timeline_chart(run).axes) == 2


def test_timeline_shades_the_warm_up_the_manifest_records(run: Run) -> None:
    def bands(figure: Figure) -> list[tuple[float, float]]:
        return [
            (round(p.get_x(), 2), round(p.get_x() + p.get_width(), 2))
            for p in figure.axes[0].patches
        ]

    assert bands(charts.timeline_chart(run)) == []
    run.manifest["config"]["warmup_s"] = 3.0
    figure = charts.timeline_chart(run)
    # Seconds 0, 1 and 2 (drawn at x = 0, 1, 2) are the warm-up, on every axis.
    assert bands(figure) == [(-0.5, 2.5)]
    assert all(ax.patches for ax in figure.axes)
    (legend,) = figure.legends
    assert any("warm-up (3 s" in t.get_text() for t in legend.get_texts())


def test_caption_names_load_duration_latency_commit_and_machine(run: Run) -> None:
    text = charts.caption(run)
    for part in ("closed, 30 users", "10 s per mode", "uniform:0.5,1.0", "abc123def456", "2 cores"):
        assert part in text


def test_same_data_same_files_png_at_twice_the_dpi(run: Run, tmp_path: Path) -> None:
    first = charts.save(charts.delivery_chart(run), tmp_path / "one", "delivery")
    second = charts.save(charts.delivery_chart(run), tmp_path / "two", "delivery")
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    svg = first[1].read_text()
    assert "<dc:date>" not in svg and not re.search(r"20\d\d-\d\d-\d\dT", svg)
    with Image.open(first[0]) as png:
        assert 1300 <= png.width <= 1500  # 7 in at 200 dpi, give or take the tight bbox


def sweep_rows(mode: str, knee_at: int) -> list[SweepRow]:
    """A load sweep as sweep.csv holds it: p99 climbing until the knee."""
    rows = []
    for step, rate in enumerate((25.0, 50.0, 100.0, 200.0)[: knee_at + 1]):
        p99 = 2_000 * 10**step if step == knee_at else 2_000
        served = rate if step < knee_at else rate * 0.6
        rows.append(
            SweepRow(mode, step, offered_per_s=rate, throughput_per_s=served, errors_pct=0.0,
                     form_p50_us=p99 // 2, form_p99_us=p99, send_p50_us=p99, send_p99_us=p99 * 2,
                     form_service_p99_us=p99, send_service_p99_us=p99 * 2, late_starts=0,
                     dropped_starts=0, knee=step == knee_at)
        )  # fmt: skip
    return rows


def test_draw_all_draws_every_chart_the_data_allows(run: Run) -> None:
    run.sweep = sweep_rows("direct", 2) + sweep_rows("redis", 3)
    drawn = draw_all(run)
    spectra = ["spectrum-send", "spectrum-form", "spectrum-api", "spectrum-delivery"]
    assert list(drawn) == ["gap", *spectra, "delivery", "timeline", "sweep"]
    for png, svg in drawn.values():
        assert png.stat().st_size > 10_000 and svg.stat().st_size > 10_000
