"""The load sweep's chart: throughput against latency per mode, each mode's knee marked."""

from __future__ import annotations

from collections.abc import Callable

from matplotlib.figure import Figure

from harness.report.charts import (
    caption,
    finish,
    log_time_axis,
    mode_colour,
    mode_linestyle,
    new_figure,
)
from harness.results.folder import Run
from harness.results.rows import SweepRow

# The p99 from intended start that each of the two plots shows.
P99: dict[str, Callable[[SweepRow], int]] = {
    "form_p99_us": lambda r: r.form_p99_us,
    "send_p99_us": lambda r: r.send_p99_us,
}


def sweep_chart(run: Run) -> Figure:
    """Served visits/s against p99 from intended start (top: form page, bottom: POST
    /send), one line per mode, a ring on the step where the mode's knee was found."""
    fig, axes = new_figure(6.6, rows=2, sharex=True)
    handles = []
    values: dict[str, list[float]] = {"form_p99_us": [], "send_p99_us": []}
    offered: list[float] = []
    for mode in run.modes:
        rows = sorted((r for r in run.sweep if r.mode == mode), key=lambda r: r.step)
        if not rows:
            continue
        style = {"color": mode_colour(mode), "ls": mode_linestyle(mode)}
        for ax, (metric, p99) in zip(axes, P99.items(), strict=True):
            points = [(max(0.1, r.throughput_per_s), float(p99(r))) for r in rows if p99(r)]
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            offered += [r.offered_per_s for r in rows]
            values[metric] += ys
            (line,) = ax.plot(xs, ys, marker="o", ms=3.5, label=run.label_of(mode), **style)
            for r in rows:
                if r.knee and p99(r):
                    served = max(0.1, r.throughput_per_s)
                    ring = {"ms": 11, "mfc": "none", "mec": style["color"], "mew": 1.8}
                    ax.plot(served, float(p99(r)), marker="o", **ring)
            if metric == "form_p99_us":
                handles.append(line)
    for ax, metric, title in (
        (axes[0], "form_p99_us", "GET / (form page) p99 from intended start, log scale"),
        (axes[1], "send_p99_us", "POST /send visit p99 from intended start, log scale"),
    ):
        log_time_axis(ax, "y", values[metric])
        ax.set_title(title)
    axes[1].set_xscale("log", base=2)
    if offered:
        axes[1].set_xlim(min(offered) / 1.5, max(offered) * 1.3)
        axes[1].set_xticks(sorted(set(offered)))
    axes[1].xaxis.set_major_formatter(lambda x, _pos: f"{x:g}")
    axes[1].xaxis.set_minor_formatter(lambda x, _pos: "")
    axes[1].set_xlabel(
        "throughput: visits served per second (log scale; ticks at the offered steps)"
    )
    note = (
        caption(run)
        + "\nRings mark each mode's knee: p99 above 10× its lowest-load value, errors above "
        "1%, or fewer than 90% of the offered visits served. The sweep stops there."
    )
    labels = [str(h.get_label()) for h in handles]
    return finish(fig, note, "Where each mode breaks", handles, labels, 6)
