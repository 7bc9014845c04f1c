"""Several ``--target`` runs side by side: ``mailbench report RUN_A RUN_B …`` where every
folder measured one server mailbench did not start (docs/target.md).

Each run is one stack — "Django + Celery 5.4 on Redis", "Dream + cohttp" — so the tables
have one row per run and the charts one bar per run, named by its ``--target-label``
(the URL's host:port when it had none) and told apart by colour. The settings of
mailbench's own servers and workers are left out: a target run starts neither. Written
by :func:`harness.report.comparison.build_comparison`, into the same files.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from harness.report.charts import (
    GREY,
    SCREEN_DPI,
    WIDTH_IN,
    axis_label,
    caption,
    finish,
    format_us,
    log_time_axis,
)
from harness.report.markdown import table, times
from harness.results.folder import Run, TargetInfo

# Okabe & Ito, "Color Universal Design", in the order runs take them; black is left out,
# since the single-run charts draw a target in black.
RUN_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442")
# The comparison's fields that describe a target run's load and machine; the others
# (worker concurrency, render, processes …) set up mailbench's own servers and workers.
TARGET_FIELDS = ("commit", "latency", "load", "duration", "machine", "cpu", "seed")
METRICS = (("form", "form"), ("send", "send"), ("delivery", "delivery"))


def is_target_comparison(runs: Sequence[Run]) -> bool:
    """Every run measured one external server: compare the servers, not the modes."""
    return all(r.target is not None and r.modes in ([], [r.target.name]) for r in runs)


def target_of(run: Run) -> TargetInfo:
    target = run.target
    assert target is not None, "is_target_comparison() chose this layout"
    return target


def note(runs: Sequence[Run], letters: Sequence[str]) -> str:
    """The charts' caption: the load, API latency, commit and machine once when every run
    shares them (the targets are on the y axis), else one line per run."""
    captions = [caption(r).removeprefix(f"target: {target_of(r).label} · ") for r in runs]
    if len(set(captions)) == 1:
        return captions[0]
    return "\n".join(f"{t}: {c}" for t, c in zip(letters, captions, strict=True))


def colour(index: int) -> str:
    return RUN_COLOURS[index % len(RUN_COLOURS)]


def _height(labels: Sequence[str], per_line: float) -> list[float]:
    """Each bar's room: a label wrapped onto several lines gets them all."""
    return [max(1, axis_label(label).count("\n") + 1) * per_line for label in labels]


def _bar_positions(labels: Sequence[str]) -> tuple[list[float], float]:
    """The y of each run's bar, top down, with room for its wrapped label, and the total."""
    rooms = _height(labels, 0.22)
    ys, top = [], 0.0
    for room in rooms:
        room = max(room, 0.34)
        ys.append(top + room / 2)
        top += room
    return ys, top


def _bar_axis(ax: Any, ys: Sequence[float], total: float, names: Sequence[str]) -> None:
    ax.set_yticks(list(ys), [axis_label(n) for n in names])
    ax.set_ylim(total, 0)
    ax.grid(axis="y", visible=False)


def latency_chart(runs: Sequence[Run], names: Sequence[str], note: str) -> Figure:
    """Form page and POST /send of each target: p50 bars, p99 ticks, log scale."""
    ys, total = _bar_positions(names)
    fig, axes = plt.subplots(
        1, 2, figsize=(WIDTH_IN, 1.9 + total), dpi=SCREEN_DPI, sharey=True, layout="constrained"
    )
    for ax, metric, title in zip(
        axes, ("form", "send"), ("GET / (form page)", "POST /send"), strict=True
    ):
        values: list[float] = []
        for i, (run, y) in enumerate(zip(runs, ys, strict=True)):
            row = run.row(target_of(run).name, metric)
            if not row or not row.count:
                continue
            p50, p99 = float(row.p50_us), float(row.p99_us)
            values += [p50, p99]
            ax.barh(y, p50, height=0.26, color=colour(i), lw=0)
            ax.plot([p99, p99], [y - 0.15, y + 0.15], color="black", lw=1.6)
        log_time_axis(ax, "x", values)
        ax.set_title(title)
        ax.set_xlabel("log scale")
    _bar_axis(axes[0], ys, total, names)
    handles = [Line2D([], [], color="black", lw=1.6, marker="|", ls="none", ms=10)]
    return finish(fig, note, "Form page and POST /send, target by target", handles,
                  ["p99 (bars: p50)"], 1)  # fmt: skip


def gap_chart(runs: Sequence[Run], names: Sequence[str], note: str) -> Figure:
    """Each target's gap (send p50 ÷ form p50), log scale, the value beside its bar."""
    ys, total = _bar_positions(names)
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 1.7 + total), dpi=SCREEN_DPI, layout="constrained")
    gaps = [run.gap(target_of(run).name) for run in runs]
    for i, (y, gap) in enumerate(zip(ys, gaps, strict=True)):
        if gap is None:
            continue
        ax.barh(y, gap, height=0.26, color=colour(i), lw=0)
        ax.annotate(f" {times(gap)}", (gap, y), va="center", ha="left", fontsize=9)
    gap_axis(ax, gaps)
    _bar_axis(ax, ys, total, names)
    return finish(fig, note, "The gap, target by target")


def _us(run: Run, metric: str, percentile: float) -> str:
    row = run.row(target_of(run).name, metric)
    return format_us(row.us_at(percentile)) if row and row.count else "–"


def latency_rows(runs: Sequence[Run], letters: Sequence[str]) -> list[dict[str, str]]:
    """One row per run: its label, the p50 and p99 of form, send and delivery, the gap."""
    rows = []
    for t, run in zip(letters, runs, strict=True):
        target = target_of(run)
        row = {"run": t, "target": target.label}
        for metric, name in METRICS:
            row[f"{name} p50"] = _us(run, metric, 50.0)
            row[f"{name} p99"] = _us(run, metric, 99.0)
        gap = run.gap(target.name)
        row["gap"] = times(gap) if gap is not None else "–"
        rows.append(row)
    return rows


def accounting_rows(runs: Sequence[Run], letters: Sequence[str]) -> list[dict[str, str]]:
    rows = []
    for t, run in zip(letters, runs, strict=True):
        target = target_of(run)
        counts = run.accounting_of(target.name)
        row = {"run": t, "target": target.label}
        if counts is None:
            rows.append(row | dict.fromkeys(ACCOUNTING_COLUMNS, "–"))
            continue
        verdict = f"**{counts.verdict}**" if not counts.sound else counts.verdict
        failures = f" ({counts.failures})" if counts.failures else ""
        rows.append(
            row
            | {c: f"{getattr(counts, c):,}" for c in ACCOUNTING_COLUMNS if c != "verdict"}
            | {"verdict": verdict + failures}
        )
    return rows


ACCOUNTING_COLUMNS = ("accepted", "delivered", "duplicates", "lost", "unexpected", "verdict")


def render(
    runs: Sequence[Run],
    letters: Sequence[str],
    names: Sequence[str],
    same: Sequence[str],
    charts: Sequence[str],
) -> str:
    run_rows = [
        {
            "run": t,
            "target": name,
            "url": f"`{target_of(r).url}`",
            "id": f"`{r.manifest.get('run_id', r.path.name)}`",
            "folder": f"`{r.path}`",
        }
        for t, name, r in zip(letters, names, runs, strict=True)
    ]
    latency = latency_rows(runs, letters)
    left = ("run", "target", "url", "id", "folder")
    sections = [
        "# mailbench comparison: " + " vs ".join(t for t in letters) + " (targets)",
        table(run_rows, list(left), left=left),
        "Same in every run:\n\n" + "\n".join(same) if same else "",
        "## Latency and the gap\n\nMedian and p99 of the form page and POST /send as the "
        "load generator saw them, of the delivery lag (posted → accepted by the fake "
        "Mailgun), and the gap (send p50 ÷ form p50).\n\n"
        + table(latency, list(latency[0]), left=("run", "target")),
        *[f"![{c}](charts/{c}.png)" for c in charts],
        "## Accounting\n\n"
        + table(
            accounting_rows(runs, letters),
            ["run", "target", *ACCOUNTING_COLUMNS],
            left=("run", "target"),
        ),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def gap_axis(ax: Any, gaps: list[float | None]) -> None:
    """The gap chart's log axis, 1× marked: the same for modes and for targets."""
    known = [g for g in gaps if g]
    ax.set_xscale("log")
    ax.set_xlim(min([1.0, *known]) / 1.5, max([10.0, *known]) * 4)
    ax.xaxis.set_major_formatter(lambda x, _p: f"{x:g}×")
    ax.axvline(1.0, color=GREY, lw=0.8)
    ax.set_xlabel("POST /send p50 ÷ form p50, log scale (1× = as fast as the form page)")
