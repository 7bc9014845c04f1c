"""Runs side by side: ``mailbench report RUN_A RUN_B …``.

The same modes on two machines, under two latency models or at two commits. Each run is
named by a letter (A, B, …) and labelled by what differs in its manifest, so a chart
never says "run 20261128-140329" where it could say "latency fixed:0.2". Bars keep each
mode's colour from the single-run charts; the runs are told apart by hatching and by
the letter beside each bar. Runs of external servers (``--target``) are compared server
by server instead, one row per run (:mod:`harness.report.targets`). Output:
``comparison.md``, ``comparison.html`` and ``charts/`` in a folder of its own (the runs'
folders are only read).
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from harness.report import targets
from harness.report.charts import (
    GREY,
    SCREEN_DPI,
    WIDTH_IN,
    caption,
    finish,
    format_us,
    log_time_axis,
    mode_colour,
    save,
)
from harness.report.html import write_html
from harness.report.markdown import table, times, verdict_cell
from harness.results import machine
from harness.results.folder import Run, load_run

HATCHES = ("", "////", "....", "xxxx", "\\\\\\\\", "++++")

# What can differ between two runs, in the order labels name it.
FIELDS: dict[str, Callable[[Run], Any]] = {
    "commit": lambda r: r.manifest.get("git_commit"),
    "latency": lambda r: _config(r).get("latency"),
    "load": lambda r: _config(r).get("load_model"),
    "duration": lambda r: f"{float(_config(r).get('duration_s', 0)):.0f} s",
    "machine": lambda r: machine.describe(r.manifest.get("machine", {})),
    "cpu": lambda r: r.manifest.get("machine", {}).get("cpu"),
    "seed": lambda r: _config(r).get("seed"),
    "worker concurrency": lambda r: _config(r).get("worker_concurrency"),
    "send delay": lambda r: f"{_config(r).get('send_delay_ms', 0)} ms",
    "render": lambda r: f"{float(_config(r).get('render_ms', 0)):g} ms",
    "nice": lambda r: _pairs(_config(r).get("nice")),
    "cpus": lambda r: _pairs(_config(r).get("cpus")),
    "processes": lambda r: "servers {} workers {} locust {}".format(
        *(
            _config(r).get(k, d)
            for k, d in (("server_procs", 1), ("worker_procs", 1), ("locust_processes", 0))
        )
    ),
}


def _pairs(mapping: dict[str, Any] | None) -> str:
    """``{"worker": 19}`` as "worker=19"; "none" when empty."""
    if not mapping:
        return "none"
    return " ".join(
        f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in sorted(mapping.items())
    )


def _config(run: Run) -> dict[str, Any]:
    config: dict[str, Any] = run.manifest.get("config", {})
    return config


def tags(count: int) -> list[str]:
    return list(string.ascii_uppercase[:count])


def _fields(runs: Sequence[Run]) -> list[str]:
    """The fields that describe these runs: of target runs, only those of the load and
    the machine (a target run starts no server or worker of mailbench's)."""
    if targets.is_target_comparison(runs):
        return list(targets.TARGET_FIELDS)
    return list(FIELDS)


def run_labels(runs: Sequence[Run]) -> list[str]:
    """For each run, what sets it apart from the others: ``latency fixed:0.2``,
    ``commit 1a2b3c, machine 8 cores …``; the run id when nothing in the manifest does.
    A target run is named by its target's label first."""
    fields = _fields(runs)
    differing = [name for name in fields if len({str(FIELDS[name](r)) for r in runs}) > 1]
    labels = [", ".join(f"{name} {FIELDS[name](r)}" for name in differing) for r in runs]
    if targets.is_target_comparison(runs):
        labels = [
            f"{targets.target_of(r).label} ({label})" if label else targets.target_of(r).label
            for label, r in zip(labels, runs, strict=True)
        ]
    if len(set(labels)) < len(runs):
        labels = [
            f"{label}, run {_run_id(r)}" if label else f"run {_run_id(r)}"
            for label, r in zip(labels, runs, strict=True)
        ]
    return labels


def _run_id(run: Run) -> str:
    return str(run.manifest.get("run_id", run.path.name))


def all_modes(runs: Sequence[Run]) -> list[str]:
    seen: list[str] = []
    for run in runs:
        seen += [m for m in run.modes if m not in seen]
    return seen


def _rows(runs: Sequence[Run]) -> list[tuple[str, int]]:
    """(mode, run index) for every bar, grouped by mode."""
    return [(m, i) for m in all_modes(runs) for i, r in enumerate(runs) if m in r.modes]


def _bar_axis(ax: Axes, rows: list[tuple[str, int]]) -> None:
    letters = tags(max(i for _m, i in rows) + 1)
    ax.set_yticks(range(len(rows)), [f"{m}  {letters[i]}" for m, i in rows])
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.grid(axis="y", visible=False)
    # A thin rule between modes: the eye groups A and B of one mode.
    for k in range(1, len(rows)):
        if rows[k][0] != rows[k - 1][0]:
            ax.axhline(k - 0.5, color=GREY, lw=0.5, alpha=0.5)


def _run_handles(labels: Sequence[str]) -> tuple[list[Any], list[str]]:
    handles: list[Any] = [
        Rectangle((0, 0), 1, 1, facecolor="#DDDDDD", edgecolor=GREY, hatch=HATCHES[i % 6])
        for i in range(len(labels))
    ]
    names = [f"{t}: {label}" for t, label in zip(tags(len(labels)), labels, strict=True)]
    return handles, names


def _note(runs: Sequence[Run]) -> str:
    return "\n".join(f"{t}: {caption(r)}" for t, r in zip(tags(len(runs)), runs, strict=True))


def latency_chart(runs: Sequence[Run], labels: Sequence[str]) -> Figure:
    """Form page and POST /send, p50 bars and p99 ticks, per mode and run, side by side."""
    rows = _rows(runs)
    fig, axes = plt.subplots(
        1,
        2,
        figsize=(WIDTH_IN, 2.0 + 0.32 * len(rows)),
        dpi=SCREEN_DPI,
        sharey=True,
        layout="constrained",
    )
    for ax, metric, title in zip(
        axes, ("form", "send"), ("GET / (form page)", "POST /send"), strict=True
    ):
        values: list[float] = []
        for y, (mode, i) in enumerate(rows):
            row = runs[i].row(mode, metric)
            if not row or not row.count:
                continue
            p50, p99 = float(row.p50_us), float(row.p99_us)
            values += [p50, p99]
            ax.barh(
                y,
                p50,
                height=0.8,
                color=mode_colour(mode),
                hatch=HATCHES[i % 6],
                edgecolor="white",
                lw=0,
            )
            ax.plot([p99, p99], [y - 0.4, y + 0.4], color="black", lw=1.6)
        log_time_axis(ax, "x", values)
        ax.set_title(title)
        ax.set_xlabel("log scale")
    _bar_axis(axes[0], rows)
    handles, names = _run_handles(labels)
    handles.append(Line2D([], [], color="black", lw=1.6, marker="|", ls="none", ms=10))
    names.append("p99 (bars: p50)")
    return finish(fig, _note(runs), "Form page and POST /send, run by run", handles, names, 1)


def gap_chart(runs: Sequence[Run], labels: Sequence[str]) -> Figure:
    """The gap (send p50 ÷ form p50) per mode and run, log scale, value at each bar."""
    rows = _rows(runs)
    fig, ax = plt.subplots(
        figsize=(WIDTH_IN, 1.8 + 0.3 * len(rows)), dpi=SCREEN_DPI, layout="constrained"
    )
    gaps = [runs[i].gap(mode) for mode, i in rows]
    for y, ((mode, i), gap) in enumerate(zip(rows, gaps, strict=True)):
        if gap is None:
            continue
        ax.barh(y, gap, height=0.8, color=mode_colour(mode), hatch=HATCHES[i % 6],
                edgecolor="white", lw=0)  # fmt: skip
        ax.annotate(f" {times(gap)}", (gap, y), va="center", ha="left", fontsize=9)
    targets.gap_axis(ax, gaps)
    _bar_axis(ax, rows)
    handles, names = _run_handles(labels)
    return finish(fig, _note(runs), "The gap, run by run", handles, names, 1)


def _cell(run: Run, mode: str, metric: str, percentile: float) -> str:
    row = run.row(mode, metric)
    return format_us(row.us_at(percentile)) if row and row.count else "–"


def _ratio(runs: Sequence[Run], mode: str, metric: str, percentile: float) -> str:
    first, last = runs[0].row(mode, metric), runs[-1].row(mode, metric)
    if not first or not last or not first.us_at(percentile) or not last.count:
        return "–"
    return times(last.us_at(percentile) / first.us_at(percentile))


def render(
    runs: Sequence[Run], labels: Sequence[str], paths: Sequence[Path], charts: Sequence[str]
) -> str:
    letters = tags(len(runs))
    last = letters[-1]
    run_rows = [
        {"run": t, "label": label, "id": f"`{_run_id(r)}`", "folder": f"`{p}`"}
        for t, label, r, p in zip(letters, labels, runs, paths, strict=True)
    ]
    same = same_in_every_run(runs)
    modes = all_modes(runs)
    gap_rows = [
        {
            "mode": m,
            **{
                t: (times(g) if (g := r.gap(m)) else "–")
                for t, r in zip(letters, runs, strict=True)
            },
        }
        for m in modes
    ]
    latency_rows = []
    for m in modes:
        for metric in ("form", "send", "delivery"):
            if not any(r.row(m, metric) for r in runs):
                continue
            row: dict[str, str] = {"mode": m, "metric": metric}
            for percentile, name in ((50.0, "p50"), (99.0, "p99")):
                for t, r in zip(letters, runs, strict=True):
                    row[f"{name} {t}"] = _cell(r, m, metric, percentile)
                row[f"{name} {last}÷A"] = _ratio(runs, m, metric, percentile)
            latency_rows.append(row)
    lost_rows = [
        {"mode": m, **{t: _accounting(r, m) for t, r in zip(letters, runs, strict=True)}}
        for m in modes
    ]
    sections = [
        "# mailbench comparison: " + " vs ".join(letters),
        table(run_rows, ["run", "label", "id", "folder"], left=["run", "label", "id", "folder"]),
        "Same in every run:\n\n" + "\n".join(same) if same else "",
        "## The gap: POST /send p50 ÷ form p50\n\n" + table(gap_rows, ["mode", *letters]),
        *[f"![{c}](charts/{c}.png)" for c in charts if c == "compare-gap"],
        "## Latency",
        *[f"![{c}](charts/{c}.png)" for c in charts if c == "compare-latency"],
        f"`{last}÷A` above 1× means slower in run {last} than in run A.\n\n"
        + table(latency_rows, list(latency_rows[0]) if latency_rows else ["mode"]),
        "## Accounting\n\n" + table(lost_rows, ["mode", *letters]),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def same_in_every_run(runs: Sequence[Run]) -> list[str]:
    return [
        f"- {name}: {FIELDS[name](runs[0])}"
        for name in _fields(runs)
        if len({str(FIELDS[name](r)) for r in runs}) == 1
    ]


def _accounting(run: Run, mode: str) -> str:
    """The mode's verdict and what made it: ``**FAILED** (3 lost)``, ``duplicates (2)``."""
    counts = run.accounting_of(mode)
    if counts is None:
        return "–"
    named = {"lost": counts.lost, "unexpected": counts.unexpected, "duplicates": counts.duplicates}
    # The label names what it counts already: "duplicates (2)", not "duplicates (2 duplicates)".
    found = [
        f"{n:,}" + ("" if name == counts.verdict else f" {name}") for name, n in named.items() if n
    ]
    return verdict_cell(counts) + (f" ({', '.join(found)})" if found else "")


def build_comparison(run_dirs: Sequence[Path], out: Path) -> Path:
    """Charts, ``comparison.md`` and ``comparison.html`` in ``out``; returns the .md."""
    runs = [load_run(Path(d)) for d in run_dirs]
    labels = run_labels(runs)
    charts_dir = out / "charts"
    charts = ["compare-gap", "compare-latency"]
    if targets.is_target_comparison(runs):
        letters = tags(len(runs))
        note = targets.note(runs, letters)
        named = [f"{t}  {label}" for t, label in zip(letters, labels, strict=True)]
        save(targets.latency_chart(runs, named, note), charts_dir, "compare-latency")
        save(targets.gap_chart(runs, named, note), charts_dir, "compare-gap")
        text = targets.render(runs, letters, labels, same_in_every_run(runs), charts)
    else:
        save(latency_chart(runs, labels), charts_dir, "compare-latency")
        save(gap_chart(runs, labels), charts_dir, "compare-gap")
        text = render(runs, labels, [r.path for r in runs], charts)
    path = out / "comparison.md"
    path.write_text(text)
    write_html(text, out, out / "comparison.html")
    return path
