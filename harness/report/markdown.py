"""The text of ``report.md``: the headline, the tables and what to watch, from a results
folder read back (:class:`~harness.results.folder.Run`). The same folder always gives the
same text: no clock, no host name, no absolute path."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

from harness.report import frameworks
from harness.report.charts import METRIC_LABELS, caption, format_us
from harness.results import machine
from harness.results.accounting import EMAIL_COUNTS, Accounting
from harness.results.folder import Run
from servers.modes import IN_REQUEST, MODES

FEW_SAMPLES = 100  # below this, p99 and beyond are the few slowest requests, not a tail

CHART_EXPLAINED = {
    "gap": "Median (bar) and p99 (black tick) of the form page, POST /send and one Mailgun "
    "API call in each mode, on a log scale; on the right, the gap (send p50 ÷ form p50).",
    "spectrum": "Latency at every percentile, HdrHistogram style: the x axis stretches the "
    "tail (90%, 99%, 99.9% …) so the slowest requests get as much room as the median; each "
    "line ends at its max (the dot).",
    "delivery": "Share of accepted emails that had reached the Mailgun API after a given "
    "time, from the moment it was posted: the cost of the queue, paid by the email instead "
    "of the user.",
    "sweep": "An open-model load raised step by step until each mode's knee (ringed): "
    "visits served per second against the p99 from each visit's intended start.",
    "timeline": "Each second of each mode's run, from its first request: the form page's "
    "p99 (gaps are seconds in which no form page was answered) and the requests answered. "
    "Shaded first seconds, if any, are the warm-up, left out of every other figure; the "
    "last second is partial.",
}

# What differs for a --target run: no Mailgun API call measured, one server.
TARGET_CHART_EXPLAINED = {
    "gap": "Median (bar) and p99 (black tick) of the form page and POST /send, on a log "
    "scale; on the right, the gap (send p50 ÷ form p50).",
}

US_COLUMNS = ("mean_us", "p50_us", "p90_us", "p99_us", "p999_us", "max_us")
SUMMARY_HEADERS = {
    "mode": "mode",
    "metric": "metric",
    "count": "count",
    "errors": "errors",
    "rate_per_s": "per s",
    "mean_us": "mean",
    "p50_us": "p50",
    "p90_us": "p90",
    "p99_us": "p99",
    "p999_us": "p99.9",
    "max_us": "max",
}


def times(factor: float) -> str:
    """A ratio as readers say it: ``1,900×``, ``12×``, ``2.4×``, ``0.023×``."""
    if factor >= 10:
        return f"{factor:,.0f}×"
    return f"{factor:.1f}×" if factor >= 1 else f"{factor:.2g}×"


def headline(run: Run) -> str:
    """One sentence with the gap, e.g. "Queued with Redis, POST /send answered in 0.4 ms —
    1,900× faster than calling Mailgun in the request"."""
    inline = next((m for m in IN_REQUEST if run.row(m, "send")), None)
    queued = [m for m in run.modes if m not in IN_REQUEST and _p50(run, m, "send")]
    # A shortcut's speed is no promise kept: a real queue makes the headline if one ran.
    queued = [m for m in queued if not _is_shortcut(m)] or queued
    if inline and queued:
        best = min(queued, key=lambda m: _p50(run, m, "send"))
        fast, slow = _p50(run, best, "send"), _p50(run, inline, "send")
        blocking = MODES[inline].blocks_event_loop
        how = "calling Mailgun in the request" + (" (blocking)" if blocking else "")
        return (
            f"Queued with {_title(best)}, POST /send answered in "
            f"{format_us(fast)} (p50) — "
            f"{times(slow / max(1.0, fast))} faster than {how} ({format_us(slow)})."
        )
    target = run.target
    if target is not None:
        gap, send, form = (
            run.gap(target.name),
            run.row(target.name, "send"),
            run.row(target.name, "form"),
        )
        if gap is None or not send or not form:
            return f"{target.label}: no sends were measured."
        return (
            f"{target.label}: POST /send answered in {format_us(send.p50_us)} (p50), "
            f"{times(gap)} the form page ({format_us(form.p50_us)})."
        )
    parts = []
    for mode in run.modes:
        gap, send = run.gap(mode), run.row(mode, "send")
        if gap is not None and send:
            parts.append(
                f"{run.label_of(mode)}: POST /send p50 {format_us(send.p50_us)}, "
                f"{times(gap)} the form page"
            )
    return ("POST /send, " + "; ".join(parts) + ".") if parts else "No sends were measured."


def blocking_sentence(run: Run) -> str | None:
    """What the blocking client did to everyone else's form page, if both were run."""
    calm = next((_p50(run, m, "form") for m in _in_request(run, blocks=False)), 0.0)
    stalled = next((_p50(run, m, "form") for m in _in_request(run, blocks=True)), 0.0)
    if not calm or not stalled:
        return None
    return (
        f"With a blocking client in the handler, the form page — which sends nothing — took "
        f"{format_us(stalled)} (p50) instead of {format_us(calm)} with the async client."
    )


FLOOR_FACTOR = 3  # form figures within this many times the floor are mostly the generator


def floor_sentence(run: Run) -> str | None:
    """What the load generator adds to every request, from the floor sample the run took
    at its start (``generator_floor_us`` in the manifest; :mod:`harness.run.calibrate`),
    and which modes' form pages are too fast to tell apart from it."""
    floor = run.manifest.get("generator_floor_us") or {}
    if not floor.get("p50"):
        return None
    p50, p99 = float(floor["p50"]), float(floor.get("p99") or 0)
    near = [
        f"{run.label_of(mode)} ({format_us(row.p50_us)})"
        for mode in run.modes
        if (row := run.row(mode, "form")) and row.count and row.p50_us <= FLOOR_FACTOR * p50
    ]
    return (
        f"The generator adds ~{format_us(p50)} (p50; p99 {format_us(p99)}: its floor, "
        "measured against a 0 ms page under this run's load at its start, see "
        f"`mailbench calibrate`); form figures within {FLOOR_FACTOR}× of it are dominated "
        "by the generator" + (f" — here {', '.join(near)}." if near else ".")
    )


def _is_shortcut(mode: str) -> bool:
    known = MODES.get(mode)
    return known is not None and known.shortcut


def _title(mode: str) -> str:
    known = MODES.get(mode)
    return known.title if known is not None else mode


def _in_request(run: Run, blocks: bool) -> list[str]:
    """The run's in-request modes whose client blocks the event loop, or does not."""
    return [m for m in IN_REQUEST if MODES[m].blocks_event_loop == blocks and run.row(m, "form")]


def _p50(run: Run, mode: str, metric: str) -> float:
    row = run.row(mode, metric)
    return float(row.p50_us) if row and row.count else 0.0


def table(
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[str],
    formats: dict[str, Callable[[Any], str]] | None = None,
    headers: dict[str, str] | None = None,
    left: Sequence[str] = ("mode", "metric"),
) -> str:
    """A Markdown table; numbers right-aligned, the ``left`` columns (names) left."""
    formats, headers = formats or {}, headers or {}
    lines = [
        "| " + " | ".join(headers.get(c, c) for c in columns) + " |",
        "|" + "|".join("---" if c in left else "---:" for c in columns) + "|",
    ]
    for row in rows:
        cells = [formats[c](row[c]) if c in formats else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _us(value: float | None) -> str:
    return "–" if value is None else format_us(value)


def gap_table(run: Run) -> str:
    # Every send time against the plain way: the async client in the request.
    reference = next(iter(_in_request(run, blocks=False)), IN_REQUEST[0])
    direct = _p50(run, reference, "send")
    rows = []
    for mode in run.modes:
        form, send = run.row(mode, "form"), run.row(mode, "send")
        if not form or not send:
            continue
        gap = run.gap(mode)
        fast = float(send.p50_us)
        rows.append(
            {
                "mode": run.label_of(mode),
                "form": _us(form.p50_us),
                "send": _us(send.p50_us),
                "send99": _us(send.p99_us),
                "gap": times(gap) if gap is not None else "–",
                "direct": times(direct / fast) if direct and fast and mode != reference else "–",
            }
        )
    headers = {
        "form": "form p50",
        "send": "send p50",
        "send99": "send p99",
        "gap": "gap (send ÷ form)",
        "direct": f"send vs {reference}",
    }
    columns = ["mode", "form", "send", "send99", "gap", "direct"]
    if run.target is not None:
        # One server, none of mailbench's to set it against.
        columns.remove("direct")
        headers["mode"] = "target"
    return table(rows, columns, headers=headers)


def summary_table(run: Run) -> str:
    formats: dict[str, Callable[[Any], str]] = dict.fromkeys(US_COLUMNS, _us)
    formats["rate_per_s"] = lambda v: f"{v:,.1f}"
    formats["count"] = formats["errors"] = lambda v: f"{v:,}"
    rows = [asdict(r) for r in run.summary]
    return table(rows, list(SUMMARY_HEADERS), formats, SUMMARY_HEADERS)


def sweep_table(run: Run) -> str:
    rows = [{**asdict(r), "knee": "**knee**" if r.knee else ""} for r in run.sweep]
    formats: dict[str, Callable[[Any], str]] = {
        "offered_per_s": lambda v: f"{v:,.0f}",
        "throughput_per_s": lambda v: f"{v:,.0f}",
        "errors_pct": lambda v: f"{v:.1f}%",
        "form_p99_us": _us,
        "send_p99_us": _us,
    }
    headers = {"offered_per_s": "offered /s", "throughput_per_s": "served /s",
               "errors_pct": "errors", "form_p99_us": "form p99",
               "send_p99_us": "send p99"}  # fmt: skip
    return table(rows, ["mode", *formats, "knee"], formats, headers)


def accounting_table(run: Run) -> str:
    if not run.accounting:
        return "(no accounting: no mode finished)"
    # The requests are counted in the latency table; here only when they fail the mode.
    rows = [
        {
            "mode": run.label_of(r.mode),
            **r.counts.as_row(),
            "verdict": verdict_cell(r.counts)
            + (f" ({r.counts.failures})" if r.counts.failures else ""),
        }
        for r in run.accounting
    ]
    columns = ["mode", *EMAIL_COUNTS, "verdict"]
    headers = {"dead_lettered": "dead-lettered"}
    if run.target is not None:
        headers["mode"] = "target"
    return table(rows, columns, {c: str for c in columns}, headers)


def framework_section(run: Run) -> str:
    """The task-queue frameworks beside the reference queues, if the run has any."""
    rows = frameworks.framework_rows(run)
    if not rows:
        return ""
    found = table(rows, frameworks.COLUMNS, headers=frameworks.HEADERS,
                  left=("mode", "config", "chaos"))  # fmt: skip
    return f"## Task-queue frameworks\n\n{frameworks.EXPLAINED}\n\n{found}"


def verdict_cell(counts: Accounting) -> str:
    """:attr:`Accounting.verdict` in a Markdown table: ``**FAILED**``, ``duplicates``, ``ok``."""
    return f"**{counts.verdict}**" if not counts.sound else counts.verdict


def _explain_mode(run: Run, mode: str) -> str:
    target = run.target
    if target is not None and mode == target.name:
        return (
            f"**{target.label}**: a server mailbench did not start, at {target.url} (`--target`)."
        )
    known = MODES.get(mode)
    return known.explanation if known is not None else ""


def warnings(run: Run) -> list[str]:
    """What a reader must know before quoting a figure, one sentence each."""
    found: list[str] = []
    planned = run.manifest.get("config", {}).get("modes", [])
    modes_info: dict[str, Any] = run.manifest.get("modes", {})
    for mode in planned:
        info = modes_info.get(mode)
        if info is None:
            found.append(f"**{mode}** was planned but did not run (the run was cut short).")
        elif "skipped" in info:
            found.append(f"**{mode}** was skipped: {info['skipped']}.")
    for mode, info in modes_info.items():
        found += [f"**{run.label_of(mode)}**: {note}." for note in info.get("notes", [])]
    for accounted in run.accounting:
        mode, c = run.label_of(accounted.mode), accounted.counts
        if c.lost:
            found.append(
                f"**{mode}**: {c.lost:,} accepted emails were never delivered (lost) — "
                "each was promised by a 2xx."
            )
        if c.unexpected:
            found.append(
                f"**{mode}**: {c.unexpected:,} deliveries of no send the load generator made."
            )
        if c.duplicates:
            found.append(f"**{mode}**: {c.duplicates:,} duplicate deliveries (same send).")
        if c.dead_lettered:
            found.append(f"**{mode}**: {c.dead_lettered:,} emails dead-lettered.")
        if c.mostly_failed:
            found.append(
                f"**{mode}**: {c.failed_requests:,} of {c.requests:,} form and send requests "
                f"failed ({c.failed_requests / c.requests:.0%}): its figures are those of "
                f"failures, not of the server; accounting **{c.verdict}**."
            )
    for r in run.summary:
        total = r.count + r.errors
        if r.errors:
            found.append(
                f"**{run.label_of(r.mode)}**: {r.errors:,} of {total:,} `{r.metric}` requests "
                f"failed ({r.errors / total:.1%}); latencies count only successes."
            )
    few = [
        f"{run.label_of(r.mode)} ({r.count})"
        for r in run.summary
        if r.metric == "send" and r.count < FEW_SAMPLES
    ]
    if few:
        found.append(
            f"POST /send has fewer than {FEW_SAMPLES} samples in {', '.join(few)}: "
            "its p99 and beyond are the few slowest requests, not a stable tail."
        )
    return found


# Settings of the servers and workers mailbench starts: a --target run starts none, so they
# describe nothing it measured.
HARNESS_ONLY = (
    "modes", "server_procs", "worker_procs", "worker_concurrency", "render_ms",
    "send_delay_ms", "send_work_us", "form_work_us", "target",
)  # fmt: skip
# Of the versions in the manifest, those of the instrument: a --target run's figures owe
# nothing to mailbench's own server, queue clients or chart libraries.
INSTRUMENT_PACKAGES = ("mailbench", "locust", "hdrhistogram")


def configuration(run: Run) -> str:
    m = run.manifest
    info = m.get("machine", {})
    target = run.target
    lines = [
        f"- run: `{m.get('run_id', run.path.name)}`, "
        f"{m.get('started_at', '?')} → {m.get('finished_at', '?')}",
        f"- commit: `{m.get('git_commit', '?')}`",
        f"- machine: {machine.describe(info)}; {info.get('cpu', '?')}; "
        f"kernel {info.get('kernel', '?')}; Python {info.get('python', '?')}",
    ]
    left_out = ("out", "run_id", *(HARNESS_ONLY if target is not None else ()))
    cfg = {k: v for k, v in m.get("config", {}).items() if k not in left_out}
    if target is not None:
        lines.append(f"- target: {_target_line(m['config']['target'], target.label)}")
    lines += [f"- {k}: `{_plain(v)}`" for k, v in sorted(cfg.items())]
    versions = m.get("versions", {})
    if target is not None:
        versions = {k: v for k, v in versions.items() if k in INSTRUMENT_PACKAGES}
    if versions:
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    return "\n".join(lines)


def _target_line(described: dict[str, Any], label: str) -> str:
    """``config.target`` of the manifest as a sentence, not a Python dict."""
    fields = _plain(described.get("fields", []))
    return (
        f"**{label}** at `{described.get('url')}`: form page `GET {described.get('form_path')}`"
        f", sends `POST {described.get('send_path')}` (fields `{fields}`); fake Mailgun "
        f"{described.get('fakegun')}; results under the name `{described.get('name')}`"
    )


def _warmup_sentence(run: Run) -> str:
    warmup = float(run.manifest.get("config", {}).get("warmup_s") or 0.0)
    if not warmup:
        return ""
    return (
        f"The load generator's figures leave out the requests sent in the warm-up, the first "
        f"{warmup:g} s after each mode's first request (their `per s` is per second after "
        "it). "
    )


def _plain(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def chart_section(name: str, run: Run | None = None) -> str:
    kind = name.split("-", 1)[0]
    explained = CHART_EXPLAINED.get(kind, "")
    if run is not None and run.target is not None:
        explained = TARGET_CHART_EXPLAINED.get(kind, explained)
    return f"![{name}](charts/{name}.png)\n\n{explained}".rstrip()


def _latency_explained(run: Run) -> str:
    """What each metric of the latency table is; a --target run has only those the load
    generator and the fake's ledger measure."""
    if run.target is not None:
        return (
            "Times recorded in µs into HdrHistograms (1 µs … 1 h, 3 significant digits) and "
            "shown in the unit that reads best. `form` and `send` are measured by the load "
            "generator, `delivery` from the send being posted to the fake Mailgun's "
            "acceptance (its ledger). `form_server` and `send_server`, if the server sends a "
            "`Server-Timing` header, are the handler's own time as it reported it. "
            "`*_intended` (open model) time each request from when it was due, counting "
            "those that failed or were never answered. "
            + _warmup_sentence(run)
            + "`per s` is successful requests per second of the run."
        )
    return (
        "Times recorded in µs into HdrHistograms (1 µs … 1 h, 3 significant "
        "digits) and shown in the unit that reads best. `form` and `send` are measured by the "
        "load generator, `api` by the caller of the API (the handler or a worker) for the "
        "calls it accepted (`api_rate_limited`, `api_retryable` and `api_failed` hold the "
        "others), `delivery` "
        "from the send being posted to the API's acceptance, `queue_wait` from "
        "the server's acceptance to a worker's first claim, `render` (with `--render-ms`) the CPU "
        "work of one email's card, in the handler (`direct`, `blocking`) or the worker. "
        "`form_server` and `send_server` are the handler's own time as the server reported "
        "it (its `Server-Timing` header): what `form` and `send` spent beyond it went to the "
        "network, HTTP parsing, waiting for the server's event loop and the load generator. "
        "`*_intended` (open model) time each request from when it was due, counting those "
        "that failed or were never answered. "
        + _warmup_sentence(run)
        + "`per s` is successful requests per second of the mode's run."
    )


def render(run: Run, charts: list[str]) -> str:
    spectra = [c for c in charts if c.startswith("spectrum-")]
    spectra_text = "\n\n".join(
        f"### {_capital(METRIC_LABELS.get(c.split('-', 1)[1], c))}\n\n![{c}](charts/{c}.png)"
        for c in spectra
    )
    extra = [blocking_sentence(run)]
    watch = warnings(run) or ["Nothing was lost, nothing unexpected delivered, no warnings."]
    title = f"# mailbench run {run.manifest.get('run_id', run.path.name)}"
    if run.target is not None:
        title += f": {run.target.label}"
    sections = [
        title,
        " ".join(s for s in [f"**{headline(run)}**", *extra] if s),
        f"*{caption(run)}*",
        floor_sentence(run) or "",
        "## The gap\n\n"
        + gap_table(run)
        + ("\n\n" + chart_section("gap", run) if "gap" in charts else ""),
        "## What to watch\n\n" + "\n".join(f"- {w}" for w in watch),
        framework_section(run),
        "## Latency by percentile\n\n" + CHART_EXPLAINED["spectrum"] + "\n\n" + spectra_text
        if spectra
        else "",
        "## Delivery lag\n\n" + chart_section("delivery") if "delivery" in charts else "",
        "## Second by second\n\n" + chart_section("timeline") if "timeline" in charts else "",
        "## Load sweep\n\n" + chart_section("sweep") + "\n\n" + sweep_table(run)
        if "sweep" in charts
        else "",
        "## Latency\n\n" + _latency_explained(run) + "\n\n" + summary_table(run),
        "## Accounting\n\nEvery send goes to an address of its own, which the fake Mailgun's "
        "ledger records. Every accepted (2xx) email must be delivered: `lost` (accepted − "
        "delivered − dead-lettered) and `unexpected` (delivered, but no send made it) must be "
        "0; `duplicates` counts extra deliveries of one send; `unacknowledged` counts sends "
        "delivered although their client saw no 2xx (a reply cut off at the end or by a "
        "crash), which is not an error.\n\n" + accounting_table(run),
        ("## The server under test\n\n" if run.target is not None else "## Modes\n\n")
        + "\n".join(f"- `{m}` — {_explain_mode(run, m)}" for m in run.modes),
        "## Configuration\n\n" + configuration(run),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"
