"""``report.md`` and the charts, rebuilt from a results folder alone."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from harness.charts import caption, draw_all, format_us
from harness.results import Run, load_run

MODE_EXPLAINED = {
    "direct": "POST /send awaits the Mailgun API call (async HTTP client).",
    "blocking": "POST /send calls the API with a blocking client inside the async handler.",
    "rabbitmq": "POST /send publishes a persistent message and waits for the publisher confirm.",
    "redis": "POST /send pushes the job to Redis (AOF on) and waits for the reply.",
    "sqlite": "POST /send commits a row to a jobs table in one SQLite file (WAL).",
    "postgres": "POST /send commits a row; workers claim with FOR UPDATE SKIP LOCKED.",
}


def headline(run: Run) -> str:
    """One sentence with the gap, e.g. "Queued with Redis, POST /send answered in 0.4 ms —
    1,900× faster than calling Mailgun in the request"."""
    direct = run.row("direct", "send")
    queued = [m for m in run.modes if m not in ("direct", "blocking") and run.row(m, "send")]
    if direct and queued:
        best = min(queued, key=lambda m: float(run.row(m, "send")["p50_us"]))  # type: ignore[index]
        fast = run.row(best, "send")
        assert fast is not None
        factor = float(direct["p50_us"]) / max(1.0, float(fast["p50_us"]))
        return (
            f"Queued with {best}, POST /send answered in {format_us(fast['p50_us'])} (p50) — "
            f"{factor:,.0f}× faster than calling Mailgun in the request "
            f"({format_us(direct['p50_us'])})."
        )
    parts = []
    for mode in run.modes:
        gap, send = run.gap(mode), run.row(mode, "send")
        if gap is not None and send:
            parts.append(
                f"{mode}: POST /send p50 {format_us(send['p50_us'])}, {gap:,.0f}× the form page"
            )
    return (
        ("Sending inside the request: " + "; ".join(parts) + ".") if parts else "No sends measured."
    )


def _table(rows: list[dict[str, Any]], columns: list[str], formats: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [formats[c](row[c]) if c in formats else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(run: Run, charts: list[str]) -> str:
    cfg = run.manifest.get("config", {})
    us = {c: format_us for c in ("mean_us", "p50_us", "p90_us", "p99_us", "p999_us", "max_us")}
    summary = _table(
        run.summary,
        [
            "mode",
            "metric",
            "count",
            "errors",
            "rate_per_s",
            "p50_us",
            "p90_us",
            "p99_us",
            "p999_us",
            "max_us",
        ],
        us,
    )
    accounting = (
        _table(run.accounting, list(run.accounting[0].keys()), {}) if run.accounting else "(none)"
    )
    gaps = [f"| {m} | {run.gap(m):,.1f}× |" for m in run.modes if run.gap(m) is not None]
    notes = [
        f"- **{mode}**: {note}"
        for mode, info in run.manifest.get("modes", {}).items()
        for note in ([info["skipped"]] if "skipped" in info else info.get("notes", []))
    ]
    problems = [
        f"- **{r['mode']}**: lost {r['lost']}, unexpected {r['unexpected']}"
        for r in run.accounting
        if r.get("lost") or r.get("unexpected")
    ]
    sections = [
        f"# mailbench run {run.manifest.get('run_id', run.path.name)}",
        f"**{headline(run)}**",
        *[f"![{name}](charts/{name}.png)" for name in charts],
        f"*{caption(run)}*",
        "## The gap: POST /send p50 ÷ form p50\n\n| mode | gap |\n|---|---|\n" + "\n".join(gaps),
        "## Modes\n\n" + "\n".join(f"- `{m}` — {MODE_EXPLAINED.get(m, '')}" for m in run.modes),
        "## Latency\n\nTimes in µs recorded into HdrHistograms "
        "(1 µs … 60 s, 3 significant digits); `form` and `send` measured by the load "
        "generator, `api` by the caller of the API, "
        "`delivery` from the server's acceptance to the API's.\n\n" + summary,
        "## Accounting\n\nEvery accepted email must be delivered: "
        "`lost` and `unexpected` must be 0; `duplicates` counts extra deliveries "
        "of one idempotency key.\n\n" + accounting,
        "## What to watch\n\n"
        + (
            "\n".join(problems + notes)
            if problems or notes
            else "- Nothing was lost, nothing unexpected was delivered, no warnings."
        ),
        "## Configuration\n\n"
        + "\n".join(f"- {k}: `{v}`" for k, v in sorted(cfg.items()))
        + f"\n- commit: `{run.manifest.get('git_commit')}`"
        + f"\n- machine: `{run.manifest.get('machine')}`",
    ]
    return "\n\n".join(sections) + "\n"


def build_report(run_dir: Path) -> Path:
    run = load_run(run_dir)
    charts = draw_all(run)
    path = run.path / "report.md"
    path.write_text(render(run, list(charts)))
    return path


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="results folder(s) to rebuild the charts and report.md of",
    )


def cli_main(args: argparse.Namespace) -> int:
    for run_dir in args.runs:
        print(build_report(run_dir))
    return 0
