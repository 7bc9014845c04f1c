"""Charts drawn from a results folder, in one style.

Legible at 700 px wide (a blog column): 7-inch figures saved as SVG and as PNG at 2× DPI,
log axes wherever values span decades, times labelled in µs / ms / s as they fit, an
Okabe–Ito (colour-blind safe) palette with one stable colour per metric and per mode,
legends outside the data, and a caption saying what load produced the figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # charts are files; never open a window

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from harness import machine
from harness.results import Run

WIDTH_IN = 7.0
SCREEN_DPI = 100  # 7 in × 100 = 700 px
PNG_DPI = 200  # 2× for sharp images on high-density screens

# Okabe & Ito, "Color Universal Design".
METRIC_COLOURS = {
    "form": "#0072B2",
    "send": "#D55E00",
    "api": "#999999",
    "delivery": "#009E73",
    "queue_wait": "#CC79A7",
}
MODE_COLOURS = {
    "direct": "#E69F00",
    "blocking": "#D55E00",
    "rabbitmq": "#CC79A7",
    "redis": "#0072B2",
    "sqlite": "#009E73",
    "postgres": "#56B4E9",
}
METRIC_LABELS = {
    "form": "GET / (form page)",
    "send": "POST /send",
    "api": "Mailgun API call",
    "delivery": "delivery lag",
    "queue_wait": "queue wait",
}

plt.rcParams.update(
    {
        "font.size": 10,
        "axes.titlesize": 12,
        "axes.titleweight": "bold",
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "svg.fonttype": "none",
        "svg.hashsalt": "mailbench",  # stable SVG ids: same data, same file
    }
)


def format_us(value: float, _pos: Any = None) -> str:
    """A time given in µs, in the unit that reads best."""
    if value <= 0:
        return "0"
    if value < 1_000:
        return f"{value:.3g} µs"
    if value < 1_000_000:
        return f"{value / 1_000:.3g} ms"
    return f"{value / 1_000_000:.3g} s"


def caption(run: Run) -> str:
    cfg = run.manifest.get("config", {})
    parts = [
        f"load: {cfg.get('load_model', '?')}",
        f"{float(cfg.get('duration_s', 0)):.0f} s per mode",
        f"API latency {cfg.get('latency', '?')}",
        f"commit {run.manifest.get('git_commit', '?')}",
        machine.describe(run.manifest.get("machine", {})),
    ]
    return " · ".join(parts)


def save(figure: Figure, charts_dir: Path, name: str) -> list[Path]:
    charts_dir.mkdir(parents=True, exist_ok=True)
    paths = [charts_dir / f"{name}.png", charts_dir / f"{name}.svg"]
    figure.savefig(paths[0], dpi=PNG_DPI, bbox_inches="tight", metadata={"Software": None})
    figure.savefig(paths[1], bbox_inches="tight", metadata={"Date": None, "Creator": None})
    plt.close(figure)
    return paths


def gap_chart(run: Run) -> Figure:
    """Per mode: form, send and API latency (p50 bars, p99 ticks) on a log axis, with the
    gap ``send p50 / form p50`` written beside each mode."""
    modes = run.modes
    metrics = ("form", "send", "api")
    bar_h = 0.26
    height = 1.6 + 0.62 * len(modes)
    fig, ax = plt.subplots(figsize=(WIDTH_IN, height), dpi=SCREEN_DPI)
    smallest, largest = float("inf"), 0.0
    for i, mode in enumerate(modes):
        for j, metric in enumerate(metrics):
            row = run.row(mode, metric)
            if not row or not row["count"]:
                continue
            y = i + (j - 1) * bar_h
            p50, p99 = float(row["p50_us"]), float(row["p99_us"])
            smallest, largest = min(smallest, p50), max(largest, p99)
            ax.barh(
                y,
                p50,
                height=bar_h * 0.9,
                color=METRIC_COLOURS[metric],
                label=METRIC_LABELS[metric] if i == 0 else None,
                zorder=2,
            )
            ax.plot(
                [p99, p99],
                [y - bar_h * 0.45, y + bar_h * 0.45],
                color="black",
                lw=1.6,
                zorder=3,
                label="p99" if (i, j) == (0, 0) else None,
            )
    if largest == 0:
        smallest, largest = 1.0, 10.0
    ax.set_xscale("log")
    ax.set_xlim(max(1.0, smallest / 3), largest * 3)
    for i, mode in enumerate(modes):
        gap = run.gap(mode)
        if gap is not None:
            text = f"{gap:,.0f}×" if gap >= 10 else f"{gap:.1f}×"
            ax.annotate(
                text,
                xy=(1.01, i),
                xycoords=("axes fraction", "data"),
                ha="left",
                va="center",
                fontsize=10,
                fontweight="bold",
            )
    ax.annotate(
        "send ÷ form\n(p50)",
        xy=(1.01, 1.0),
        xycoords="axes fraction",
        ha="left",
        va="bottom",
        fontsize=8,
        color="#444444",
    )
    ax.set_yticks(range(len(modes)), modes)
    ax.set_ylim(len(modes) - 0.5, -0.5)
    ax.xaxis.set_major_locator(LogLocator(base=10))
    ax.xaxis.set_major_formatter(FuncFormatter(format_us))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(axis="y", visible=False)
    ax.set_xlabel("latency, log scale — bars: median (p50); black ticks: p99")
    ax.set_title("Sending email inside the request vs serving the form", loc="left", pad=28)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda k: labels[k] == "p99")
    ax.legend(
        [handles[k] for k in order],
        [labels[k] for k in order],
        loc="lower left",
        bbox_to_anchor=(0.0, 1.0),
        ncol=4,
        frameon=False,
        fontsize=9,
        handlelength=1.2,
        columnspacing=1.2,
        borderaxespad=0.2,
    )
    ax.annotate(
        caption(run),
        xy=(0, 0),
        xycoords="axes fraction",
        xytext=(0, -42),
        textcoords="offset points",
        fontsize=7.5,
        color="#444444",
        ha="left",
        va="top",
        wrap=True,
    )
    fig.tight_layout()
    return fig


def draw_all(run: Run) -> dict[str, list[Path]]:
    charts_dir = run.path / "charts"
    return {"gap": save(gap_chart(run), charts_dir, "gap")}
