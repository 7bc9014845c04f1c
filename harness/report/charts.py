"""Charts drawn from a results folder, in one style.

Legible at 700 px wide (a blog column): 7-inch figures saved as SVG and as PNG at 2× DPI,
log axes wherever values span decades, times labelled in µs / ms / s as they fit, an
Okabe–Ito (colour-blind safe) palette with one stable colour (and line style) per mode
and one colour per metric, legends above the plot where they cannot cover data, and a
caption saying what load produced the figures. Same data, same bytes: SVG ids are salted
with a constant and no file carries a date or a software version.
"""

from __future__ import annotations

import io
import math
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # charts are files; never open a window

import matplotlib.pyplot as plt
from hdrh.histogram import HdrHistogram
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import (
    FixedLocator,
    FuncFormatter,
    LogLocator,
    MaxNLocator,
    NullFormatter,
    NullLocator,
)
from PIL import Image

from harness.results import machine
from harness.results.folder import Run
from servers.modes import MODES

WIDTH_IN = 7.0
SCREEN_DPI = 100  # 7 in × 100 = 700 px
PNG_DPI = 200  # 2× for sharp images on high-density screens
CAPTION_CHARS = 118  # one caption line at 7.5 pt across 7 in

# fmt: off
# Okabe & Ito, "Color Universal Design".
METRIC_COLOURS = {"form": "#0072B2", "send": "#D55E00", "api": "#999999",
                  "delivery": "#009E73", "queue_wait": "#CC79A7", "render": "#E69F00"}
METRIC_LABELS = {"form": "GET / (form page)", "send": "POST /send", "api": "Mailgun API call",
                 "delivery": "delivery lag", "queue_wait": "queue wait",
                 "render": "card render (CPU work)",
                 "send_intended": "POST /send from intended start",
                 "form_intended": "GET / from intended start",
                 "send_server": "POST /send in the server (Server-Timing)",
                 "form_server": "GET / in the server (Server-Timing)"}
# Spectrum charts in reading order; metrics not named here follow.
SPECTRUM_ORDER = ("send", "send_intended", "send_server", "form", "form_intended",
                  "form_server", "api", "delivery", "queue_wait", "render")
# 1/(1−p) positions of the percentile axis and their labels.
PERCENTILE_TICKS = {1.0: "0%", 2.0: "50%", 10.0: "90%", 100.0: "99%", 1e3: "99.9%",
                    1e4: "99.99%", 1e5: "99.999%", 1e6: "99.9999%"}
GREY = "#444444"

plt.rcParams.update({
    "font.size": 10, "legend.fontsize": 9, "legend.frameon": False, "lines.linewidth": 1.8,
    "axes.titlesize": 10, "axes.titleweight": "bold", "axes.titlelocation": "left",
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
    "svg.fonttype": "none",  # text stays text: smaller files, searchable, selectable
    "svg.hashsalt": "mailbench",  # stable SVG ids: same data, same file
})
# fmt: on


def format_us(value: float, _pos: Any = None) -> str:
    """A time given in µs, in the unit that reads best (999,999 µs reads "1 s")."""
    if value <= 0:
        return "0"
    value = float(f"{value:.3g}")  # round first, so the unit fits the rounded value
    if value < 1_000:
        return f"{value:.3g} µs"
    if value < 1_000_000:
        return f"{value / 1_000:.3g} ms"
    return f"{value / 1_000_000:.3g} s"


def caption(run: Run) -> str:
    cfg = run.manifest.get("config", {})
    target = run.target
    parts = [
        *([f"target: {target.label}"] if target is not None else []),
        f"load: {cfg.get('load_model', '?')}",
        f"{float(cfg.get('duration_s', 0)):.0f} s" + (" per mode" if target is None else ""),
        f"API latency {cfg.get('latency', '?')}",
        f"commit {run.manifest.get('git_commit', '?')}",
        machine.describe(run.manifest.get("machine", {})),
    ]
    return " · ".join(parts)


LABEL_CHARS = 28  # a label on a bar chart's y axis, per line: the bars keep their width


def axis_label(text: str) -> str:
    """A name for a bar chart's y axis, wrapped onto lines short enough not to squeeze
    the bars (a ``--target-label`` can be a sentence)."""
    return textwrap.fill(text, LABEL_CHARS, break_long_words=True)


def mode_colour(mode: str) -> str:
    """The mode's colour in the registry (:mod:`servers.modes`); black for a ``--target``."""
    known = MODES.get(mode)
    return known.colour if known is not None else "#000000"


def mode_linestyle(mode: str) -> str:
    """Modes that send inside the request are dashed or dotted, queued modes solid, so
    lines stay apart even where two colours look alike."""
    known = MODES.get(mode)
    return known.linestyle if known is not None else "-"


def save(figure: Figure, charts_dir: Path, name: str) -> list[Path]:
    charts_dir.mkdir(parents=True, exist_ok=True)
    paths = [charts_dir / f"{name}.png", charts_dir / f"{name}.svg"]
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=PNG_DPI, bbox_inches="tight")
    # 256 colours lose nothing visible on flat-coloured charts and make files 3× smaller.
    with Image.open(buffer) as image:
        flat = image.convert("RGB").quantize(
            256, Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE
        )
        flat.save(paths[0], format="PNG", optimize=True, dpi=(PNG_DPI, PNG_DPI))
    figure.savefig(
        paths[1], bbox_inches="tight", metadata={"Date": None, "Creator": None, "Format": None}
    )
    plt.close(figure)
    svg = paths[1].read_text()
    # Belt and braces: whatever the matplotlib version, no date survives into the SVG.
    paths[1].write_text(re.sub(r"\s*<dc:date>[^<]*</dc:date>", "", svg))
    return paths


# -- shared layout -----------------------------------------------------------------------
def new_figure(height_in: float, rows: int = 1, sharex: bool = False) -> tuple[Figure, Any]:
    """A 700 px wide figure whose layout leaves room for a title, a legend above the plot
    and a caption below it (matplotlib's constrained layout)."""
    return plt.subplots(
        rows, 1, figsize=(WIDTH_IN, height_in), dpi=SCREEN_DPI, sharex=sharex, layout="constrained"
    )


def finish(
    fig: Figure,
    note: str,
    title: str,
    handles: Sequence[Any] = (),
    labels: Sequence[str] = (),
    ncols: int = 3,
) -> Figure:
    """Title top left, legend between title and plot (never over the data), the caption
    ``note`` under everything. The title is the legend's own, so the two never overlap."""
    fig.legend(
        list(handles), list(labels), loc="outside upper left", ncols=ncols, title=title,
        title_fontproperties={"size": 12, "weight": "bold"}, alignment="left",
        handlelength=2.2, columnspacing=1.4, borderaxespad=0.0, borderpad=0.2,
    )  # fmt: skip
    text = "\n".join(textwrap.fill(line, CAPTION_CHARS) for line in note.splitlines())
    fig.supxlabel(text, x=0.0, ha="left", fontsize=7.5, color=GREY)
    return fig


def log_time_axis(ax: Axes, which: str, values: Sequence[float]) -> None:
    """A log axis of µs values labelled in µs / ms / s: ticks at each decade, or at 1-2-5
    (1-1.5-2-3-5-7 within one decade) when the values span two decades or less and the
    axis is long enough for that many labels."""
    fits = _labels_that_fit(ax, which)
    low, high = time_limits(values, fits)
    axis: Axis = getattr(ax, f"{which}axis")
    getattr(ax, f"set_{which}scale")("log")
    getattr(ax, f"set_{which}lim")(low, high)
    axis.set_major_locator(LogLocator(base=10, subs=_steps(values, fits) or (1.0,)))
    axis.set_major_formatter(FuncFormatter(format_us))
    axis.set_minor_formatter(NullFormatter())


def _labels_that_fit(ax: Axes, which: str) -> int:
    """Tick labels such as "100 ms" that fit along the axis side by side (x) or stacked (y)."""
    width, height = ax.get_figure().get_size_inches()  # type: ignore[union-attr]
    box = ax.get_position()
    length = box.width * width if which == "x" else box.height * height
    return max(3, int(length / (0.55 if which == "x" else 0.25)))


def _span(values: Sequence[float]) -> tuple[float, float]:
    positive = [v for v in values if v > 0] or [1.0, 10.0]
    return min(positive), max(positive) * 1.05  # room for the max's marker


def _steps(values: Sequence[float], fits: int = 1000) -> tuple[float, ...] | None:
    """Tick multiples of a power of ten for values this close together, if ``fits``
    labels leave room for them; None: decades."""
    low, high = _span(values)
    candidates: list[tuple[float, ...]] = []
    if high / low <= 10:
        candidates.append((1.0, 1.5, 2.0, 3.0, 5.0, 7.0))
    if high / low <= 100:
        candidates.append((1.0, 2.0, 5.0))
    for multiples in candidates:
        if len(_ticks_between(values, multiples)) <= fits:
            return multiples
    return None


def _ticks_between(values: Sequence[float], multiples: tuple[float, ...]) -> list[float]:
    low, high = _limits(values, multiples)
    steps = [m * 10.0**e for e in range(0, 9) for m in multiples]
    return [s for s in steps if low <= s <= high]


def _limits(values: Sequence[float], multiples: tuple[float, ...] | None) -> tuple[float, float]:
    low_value, high_value = _span(values)
    if multiples is None:
        low = 10.0 ** math.floor(math.log10(low_value))
        return max(1.0, low), 10.0 ** math.ceil(math.log10(high_value))
    steps = [m * 10.0**e for e in range(0, 9) for m in multiples]
    low = max((s for s in steps if s <= low_value), default=1.0)
    high = min((s for s in steps if s >= high_value), default=steps[-1])
    return low, max(high, low * 1.5)


def time_limits(values: Sequence[float], fits: int = 1000) -> tuple[float, float]:
    """Limits on labelled ticks: whole decades around values that span decades, the
    nearest steps of :func:`_steps` around values that do not."""
    return _limits(values, _steps(values, fits))


# -- gap ---------------------------------------------------------------------------------
def gap_chart(run: Run) -> Figure:
    """Per mode: form, send and API latency (p50 bars, p99 ticks) on a log axis, with the
    gap ``send p50 / form p50`` written beside each mode."""
    modes = run.modes
    metrics = ("form", "send", "api")
    bar_h = 0.26
    fig, ax = new_figure(1.9 + 0.62 * len(modes))
    values: list[float] = []
    for i, mode in enumerate(modes):
        for j, metric in enumerate(metrics):
            row = run.row(mode, metric)
            if not row or not row.count:
                continue
            y = i + (j - 1) * bar_h
            p50, p99 = float(row.p50_us), float(row.p99_us)
            values += [p50, p99]
            ax.barh(y, p50, height=bar_h * 0.9, color=METRIC_COLOURS[metric], zorder=2)
            ax.plot([p99, p99], [y - bar_h * 0.45, y + bar_h * 0.45], color="black", lw=1.6)
    log_time_axis(ax, "x", values)
    for i, mode in enumerate(modes):
        gap = run.gap(mode)
        if gap is not None:
            text = f"{gap:,.0f}×" if gap >= 10 else f"{gap:.1f}×"
            ax.annotate(text, xy=(1.01, i), xycoords=("axes fraction", "data"), ha="left",
                        va="center", fontweight="bold")  # fmt: skip
    ax.annotate("send ÷ form\n(p50)", xy=(1.01, -0.5), xycoords=("axes fraction", "data"),
                ha="left", va="bottom", fontsize=8, color=GREY)  # fmt: skip
    ax.set_yticks(range(len(modes)), [axis_label(run.label_of(m)) for m in modes])
    ax.set_ylim(len(modes) - 0.5, -0.5)
    ax.grid(axis="y", visible=False)
    ax.set_xlabel("latency, log scale — bars: median (p50); black ticks: p99")
    # A --target run has no API calls of its own to show.
    shown = [m for m in metrics if any(run.row(mode, m) for mode in modes)]
    handles: list[Any] = [Rectangle((0, 0), 1, 1, color=METRIC_COLOURS[m]) for m in shown]
    handles.append(Line2D([], [], color="black", lw=1.6, marker="|", ls="none", ms=10))
    labels = [METRIC_LABELS[m] for m in shown] + ["p99"]
    title = "Sending email inside the request vs serving the form"
    return finish(fig, caption(run), title, handles, labels, 4)


# -- percentile spectrum -----------------------------------------------------------------
def spectrum_points(histogram: HdrHistogram, points: int = 160) -> tuple[list[float], list[int]]:
    """HdrHistogram's percentile spectrum: ``1/(1−p)`` against the latency at ``p``, from
    0% to the last recorded value, ending at the max (x = the count, the last sample)."""
    count = int(histogram.get_total_count())
    if count == 0:
        return [], []
    top = math.log10(count)
    xs = sorted({round(10 ** (top * k / (points - 1)), 9) for k in range(points)})
    percentiles = [100.0 * (1.0 - 1.0 / x) for x in xs]
    at = histogram.get_percentile_to_value_dict(percentiles)
    ys = [int(at[p]) for p in percentiles]
    return [*xs, float(count)], [*ys, int(histogram.get_max_value())]


def percentile_axis(ax: Axes, largest_count: int) -> None:
    right = 10.0 ** max(1, math.ceil(math.log10(max(largest_count, 2))))
    ax.set_xscale("log")
    ax.set_xlim(1.0, right)
    ticks = [x for x in PERCENTILE_TICKS if x <= right]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _p: PERCENTILE_TICKS.get(x, "")))
    ax.xaxis.set_minor_locator(NullLocator())  # 2…9 × 10^k mean nothing on this axis
    ax.set_xlabel("percentile (log scale of 1 / (1 − p))")


def spectrum_chart(run: Run, metric: str) -> Figure:
    """One line per mode: the latency at every percentile of ``metric``, max marked."""
    fig, ax = new_figure(4.4)
    handles, labels, values, largest = [], [], [], 0
    for mode in run.modes:
        histogram = run.histograms.get((mode, metric))
        if histogram is None or not histogram.get_total_count():
            continue
        xs, ys = spectrum_points(histogram)
        (line,) = ax.plot(xs, ys, color=mode_colour(mode), ls=mode_linestyle(mode))
        ax.plot(xs[-1], ys[-1], "o", color=mode_colour(mode), ms=5)
        values += [ys[0], ys[-1]]
        largest = max(largest, len(xs) and int(xs[-1]))
        handles.append(line)
        labels.append(f"{run.label_of(mode)} (n={int(xs[-1]):,}, max {format_us(ys[-1])})")
    percentile_axis(ax, largest)
    log_time_axis(ax, "y", values)
    ax.set_ylabel("latency, log scale")
    handles.append(Line2D([], [], color=GREY, marker="o", ls="none", ms=5))
    labels.append("max (the last sample)")
    label = METRIC_LABELS.get(metric, metric)
    title = f"{label[:1].upper()}{label[1:]}: latency by percentile"
    return finish(fig, caption(run), title, handles, labels, 2)


# -- delivery lag ------------------------------------------------------------------------
def cdf_points(histogram: HdrHistogram) -> tuple[list[int], list[float]]:
    """Every recorded value and the share of samples at or below it."""
    total = int(histogram.get_total_count())
    xs: list[int] = []
    ys: list[float] = []
    for item in histogram.get_recorded_iterator():
        xs.append(int(histogram.get_highest_equivalent_value(item.value_iterated_to)))
        ys.append(item.total_count_to_this_value / total)
    return xs, ys


def delivery_chart(run: Run) -> Figure:
    """Per mode, the share of delivered emails against the time from the send being posted to
    the API's acceptance (step CDF, log time axis)."""
    fig, ax = new_figure(4.2)
    handles, labels, values = [], [], []
    for mode in run.modes:
        histogram = run.histograms.get((mode, "delivery"))
        if histogram is None or not histogram.get_total_count():
            continue
        xs, ys = cdf_points(histogram)
        (line,) = ax.step(
            [xs[0], *xs], [0.0, *ys], where="post", color=mode_colour(mode), ls=mode_linestyle(mode)
        )
        values += [xs[0], xs[-1]]
        handles.append(line)
        p50 = int(histogram.get_value_at_percentile(50.0))
        count = len(ys) and int(histogram.get_total_count())
        labels.append(f"{run.label_of(mode)} (n={count:,}, p50 {format_us(p50)})")
    log_time_axis(ax, "x", values)
    ax.set_ylim(0, 1.02)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _p: f"{y:.0%}"))
    for level in (0.5, 0.99):
        ax.axhline(level, color=GREY, lw=0.8, ls=(0, (1, 3)), zorder=0)
    ax.set_xlabel("time from posting the form to the API accepting the email, log scale")
    ax.set_ylabel("emails delivered")
    title = "Delivery lag: how long until the email reaches the API"
    return finish(fig, caption(run), title, handles, labels, 2)


# -- per second --------------------------------------------------------------------------
def warmup_s(run: Run) -> float:
    """The seconds of each mode's load left out of its figures, as the manifest records
    them (0 for folders written before the warm-up existed)."""
    return float(run.manifest.get("config", {}).get("warmup_s") or 0.0)


def timeline_chart(run: Run) -> Figure:
    """Per second and mode: the form page's p99 (log), the requests answered and, when it
    was sampled, the queue's depth. Open-model runs show the p99 from intended start. The
    warm-up (the first seconds after each mode's first request, left out of every other
    figure) is a shaded band."""
    rows = run.timeseries
    queued = any(r.queue_depth is not None for r in rows)
    fig, axes = new_figure(7.2 if queued else 5.4, rows=3 if queued else 2, sharex=True)
    intended = any(r.metric == "form_intended" for r in rows)
    form = "form_intended" if intended else "form"
    handles, values = [], []
    for mode in run.modes:
        mine = [r for r in rows if r.mode == mode]
        if not mine:
            continue
        # Every second of the mode's run, so a second without answers shows as a gap in
        # the p99 line and as 0 requests, not as a line drawn across it.
        seconds = list(range(mine[0].second, max(r.second for r in mine) + 1))
        series: dict[str, dict[int, float]] = {k: {} for k in ("p99", "answered", "depth")}
        for r in mine:
            if r.metric in ("form", "send"):
                answered = series["answered"].get(r.second, 0.0)
                series["answered"][r.second] = answered + (r.requests or 0)
            if r.metric == form and r.p99_us is not None:
                series["p99"][r.second] = r.p99_us
                values.append(r.p99_us)
            if r.queue_depth is not None:
                series["depth"][r.second] = r.queue_depth
        style = {"color": mode_colour(mode), "ls": mode_linestyle(mode)}
        # Markers: a lone second between two stalls is a point, not an invisible line.
        p99s = [series["p99"].get(s, math.nan) for s in seconds]
        (line,) = axes[0].plot(seconds, p99s, label=run.label_of(mode), marker="o", ms=2.5, **style)
        axes[1].plot(seconds, [series["answered"].get(s, 0.0) for s in seconds], **style)
        if queued and series["depth"]:
            depth_seconds = sorted(series["depth"])
            depths = [series["depth"][s] for s in depth_seconds]
            axes[2].plot(depth_seconds, depths, marker="o", ms=2.5, **style)
        handles.append(line)
    log_time_axis(axes[0], "y", values)
    axes[0].set_title(
        "GET / (form page) p99 in each second"
        + (", from intended start" if intended else "")
        + ", log scale"
    )
    axes[1].set_title("requests answered in each second (form + send)")
    if queued:
        axes[2].set_title("jobs waiting in the queue (sampled each second)")
        axes[2].yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[1:]:
        ax.set_ylim(bottom=0)
    warmup = warmup_s(run)
    if warmup > 0 and rows:
        for ax in axes:
            # Second s holds what was answered in [s, s + 1): the band ends at the warm-up.
            ax.axvspan(-0.5, warmup - 0.5, color=GREY, alpha=0.12, lw=0, zorder=0)
        handles.append(Rectangle((0, 0), 1, 1, color=GREY, alpha=0.12, lw=0))
        handles[-1].set_label(f"warm-up ({warmup:g} s, not in the other figures)")
    axes[-1].set_xlabel("seconds since each mode's first request (each mode runs on its own)")
    labels = [str(h.get_label()) for h in handles]
    return finish(fig, caption(run), "Second by second", handles, labels, 6)
