"""The report's framework table: each task-queue framework's mode beside the reference
queues of the same run, on what a user choosing one needs — what the request pays to
enqueue (``send`` p50/p99/p99.9), how long until the email reaches the API
(``delivery`` p50/p99), and whether accepted mail survived (the accounting; in a chaos
run, under the worker kills, broker restart and API faults it records per mode).

Which modes are frameworks and which reference queues comes from the mode registry
(:mod:`servers.modes`), so a new framework's modes join the table with no change here.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from harness.report.charts import format_us
from harness.results.folder import Run
from servers.modes import MODES

COLUMNS = ("mode", "config", "send50", "send99", "send999", "lag50", "lag99",
           "accepted", "delivered", "lost", "duplicates", "dead", "chaos")  # fmt: skip
HEADERS = {
    "config": "configuration",
    "send50": "enqueue p50",
    "send99": "enqueue p99",
    "send999": "enqueue p99.9",
    "lag50": "delivery p50",
    "lag99": "delivery p99",
    "dead": "dead-lettered",
    "chaos": "broken",
}


def compared_modes(run: Run) -> list[str]:
    """The run's queued modes, when a framework is among them: frameworks first."""
    queued = [m for m in run.modes if (mode := MODES.get(m)) is not None and mode.queued]
    frameworks = [m for m in queued if MODES[m].framework is not None]
    return [*frameworks, *(m for m in queued if m not in frameworks)] if frameworks else []


def chaos_events(run: Run, mode: str) -> list[dict[str, Any]] | None:
    """What chaos did to the mode (kills, restarts), None if it was not broken."""
    path = run.layout.chaos_events(mode)
    try:
        events = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return [e for e in events if isinstance(e, dict)] if isinstance(events, list) else None


def _broken(events: list[dict[str, Any]] | None) -> str:
    if events is None:
        return "–"
    kinds = Counter(str(e.get("kind")) for e in events)
    return f"{kinds['kill']} kills, {kinds['restart']} broker restart(s)"


def _us(run: Run, mode: str, metric: str, percentile: float) -> str:
    row = run.row(mode, metric)
    return format_us(row.us_at(percentile)) if row is not None and row.count else "–"


def framework_rows(run: Run) -> list[dict[str, Any]]:
    """One row per compared mode, its cells formatted (:data:`COLUMNS`); none without a
    framework mode in the run."""
    rows = []
    for name in compared_modes(run):
        mode, counts = MODES[name], run.accounting_of(name)
        figures: dict[str, Any] = dict.fromkeys(
            ("accepted", "delivered", "lost", "duplicates", "dead"), "–"
        )
        if counts is not None:
            figures |= {
                "accepted": f"{counts.accepted:,}",
                "delivered": f"{counts.delivered:,}",
                "lost": f"**{counts.lost:,}**" if counts.lost else "0",
                "duplicates": f"{counts.duplicates:,}",
                "dead": f"{counts.dead_lettered:,}",
            }
        rows.append(
            {
                "mode": name,
                "config": mode.config or "reference queue",
                "send50": _us(run, name, "send", 50),
                "send99": _us(run, name, "send", 99),
                "send999": _us(run, name, "send", 99.9),
                "lag50": _us(run, name, "delivery", 50),
                "lag99": _us(run, name, "delivery", 99),
                **figures,
                "chaos": _broken(chaos_events(run, name)),
            }
        )
    return rows


EXPLAINED = (
    "Each framework's modes (`default`: as it ships; `reliable`: as its docs recommend) "
    "beside the reference queues of this run, under the same load: enqueue is `POST /send` "
    "as the load generator timed it (the handler answers once the broker took the job), "
    "delivery from the send to the API's acceptance. `broken` is what `mailbench chaos` did "
    "to the mode while its load ran (worker SIGKILLs, a broker crash and restart); lost "
    "must be 0 for a 2xx to mean what it says. The enqueue cost at fixed open-model rates "
    "and the worker's deliveries per second are `benchmarks/frameworks.py`'s "
    "(docs/frameworks.md)."
)
