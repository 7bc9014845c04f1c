"""The load sweep: raise the offered load on one mode step by step until its knee.

Each step is an open-model Locust run (visits started at a fixed rate, whatever the
server does) against the same server and workers. The knee is the first step where a
metric's p99 from intended start exceeds ``KNEE_FACTOR`` times its value at the lowest
step, where more than 1% of requests fail, or where fewer than 90% of the offered visits
were served; the sweep stops there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from harness.results.collect import read_locust
from harness.results.rows import SweepRow
from servers.metrics import Recorder, Summary

KNEE_FACTOR = 10.0
KNEE_ERRORS = 0.01
KNEE_SERVED = 0.9
RATES = (25.0, 50.0, 100.0, 200.0, 400.0, 800.0, 1600.0, 3200.0)


@dataclass(frozen=True, slots=True)
class SweepSettings:
    rates: tuple[float, ...] = RATES
    step_s: float = 8.0


RunStep = Callable[[float, float, Path], None]  # (rate, seconds, hdr folder) -> None


def sweep_mode(mode: str, settings: SweepSettings, raw: Path, run_step: RunStep) -> list[SweepRow]:
    rows: list[SweepRow] = []
    baseline: dict[str, int] = {}
    for step, rate in enumerate(settings.rates):
        folder = raw / f"step-{step:02d}"
        run_step(rate, settings.step_s, folder)
        row = step_row(mode, step, rate, settings.step_s, folder)
        p99s = {"form": row.form_p99_us, "send": row.send_p99_us}
        for metric, p99 in p99s.items():
            if p99 and metric not in baseline:
                baseline[metric] = p99
        knee = (
            row.errors_pct > KNEE_ERRORS * 100
            or row.throughput_per_s < KNEE_SERVED * rate
            or any(p99s[m] and p99s[m] > KNEE_FACTOR * base for m, base in baseline.items())
        )
        row = replace(row, knee=knee)
        rows.append(row)
        print(
            f"[{mode:>8}] sweep step {step}: offered {rate:g} visits/s, served "
            f"{row.throughput_per_s:.0f}/s, form p99 {row.form_p99_us / 1000:.1f} ms"
            + ("  <- knee" if knee else ""),
            flush=True,
        )
        if knee:
            break
    return rows


def step_row(mode: str, step: int, rate: float, seconds: float, folder: Path) -> SweepRow:
    """One step's figures, its knee not yet judged."""
    data = read_locust(folder)
    recorder = Recorder()
    recorder.add_encoded(data["histograms"])
    summaries = {name: Summary.of(h) for name, h in recorder.histograms.items()}
    requests = sum(s.count for n, s in summaries.items() if n in ("form", "send"))
    errors = sum(data.get("errors", {}).values())
    counters = data.get("counters", {})
    # Served rate = offered rate × the share of scheduled visits that completed: both
    # counted over the same schedule, whatever Locust's start-up and stop took.
    scheduled = int(counters.get("scheduled_starts", 0))
    served = rate * int(counters.get("completed_starts", 0)) / scheduled if scheduled else 0.0

    def p(name: str, attr: str) -> int:
        summary = summaries.get(name)
        return int(getattr(summary, attr)) if summary else 0

    return SweepRow(
        mode=mode,
        step=step,
        offered_per_s=rate,
        throughput_per_s=round(served, 1),
        errors_pct=round(100 * errors / max(1, requests + errors), 2),
        form_p50_us=p("form_intended", "p50_us"),
        form_p99_us=p("form_intended", "p99_us"),
        send_p50_us=p("send_intended", "p50_us"),
        send_p99_us=p("send_intended", "p99_us"),
        form_service_p99_us=p("form", "p99_us"),
        send_service_p99_us=p("send", "p99_us"),
        late_starts=int(counters.get("late_starts", 0)),
        dropped_starts=int(counters.get("dropped_starts", 0)),
        knee=False,
    )
