"""Turn what one mode's processes wrote into a :class:`~harness.results.folder.ModeResult`.

Inputs, all under ``raw/<mode>/``: ``locust-hdr.json`` (the load generator's µs
histograms, per second too, open-model counters, its CPU), ``server*.json`` (each server
process's ``api`` and ``render`` histograms), ``worker-*.json`` (``api`` and the other
outcomes of API calls, ``queue_wait``, ``render``), ``dead-letters-*.jsonl`` (what
workers dead-lettered, as they went), ``depth.json`` (queue depth sampled once a second)
and the fake Mailgun's ledger.
Percentiles are only ever taken from merged histograms.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.results.accounting import reconcile
from harness.results.folder import ModeResult
from harness.results.rows import TimeseriesRow
from servers.metrics import HIGHEST_US, Recorder, Summary, clamped, decode

GENERATOR_BOUND_CPU = 90.0  # percent of one core, as Locust's own cpu_warning
_SERVER = frozenset({"api", "render"})  # the histograms taken from server processes
# and from workers: their API calls by outcome (see servers.worker), first claims, renders
_WORKER = frozenset(
    {"api", "api_rate_limited", "api_retryable", "api_failed", "queue_wait", "render"}
)


def collect_mode(
    mode: str, raw: Path, duration: float, ledger: list[dict[str, Any]], notes: list[str]
) -> ModeResult:
    locust = json.loads((raw / "locust-hdr.json").read_text())
    recorder = Recorder()
    recorder.add_encoded(locust["histograms"])
    # One file per server and worker process that shut down cleanly (none for a server
    # mailbench did not start, or a process killed on purpose).
    for path in sorted(raw.glob("server*.json")):
        server = json.loads(path.read_text())
        recorder.add_encoded({k: v for k, v in server["histograms"].items() if k in _SERVER})
    for path in sorted(raw.glob("worker-*.json")):
        worker = json.loads(path.read_text())
        recorder.add_encoded({k: v for k, v in worker["histograms"].items() if k in _WORKER})
    accepted, failed = client_sends(raw)
    accounting, delivery = reconcile(accepted, ledger, dead_lettered_recipients(raw), failed)
    histograms = dict(recorder.histograms)
    if delivery.get_total_count():
        histograms["delivery"] = delivery
    depth_path = raw / "depth.json"
    depths = json.loads(depth_path.read_text()) if depth_path.is_file() else {}
    timeseries = timeseries_rows(mode, locust, depths)
    notes = [*notes, *generator_notes(locust), *open_model_notes(locust, histograms, timeseries)]
    notes += ceiling_notes(histograms)
    return ModeResult(
        mode=mode,
        duration_s=round(duration, 3),
        histograms=histograms,
        errors=dict(locust.get("errors", {})),
        accounting=accounting,
        timeseries=timeseries,
        notes=notes,
        generator=generator_health(locust),
    )


def client_sends(raw: Path) -> tuple[list[tuple[str, float]], list[str]]:
    """The sends Locust saw accepted (recipient, when posted) and the others it attempted,
    over the main phase and every sweep step under ``raw``."""
    accepted: list[tuple[str, float]] = []
    failed: list[str] = []
    for path in sorted(raw.rglob("locust-hdr.json")):
        locust = json.loads(path.read_text())
        accepted += [(str(r), float(at)) for r, at in locust.get("sends_ok", [])]
        # A send started but never answered (cut short at the stop) was attempted too.
        failed += [str(r) for r in locust.get("sends_failed", [])]
        failed += [str(r) for r in locust.get("sends_started", [])]
    return accepted, failed


def dead_lettered_recipients(raw: Path) -> list[str]:
    """Recipients of dead-lettered jobs, from the journals workers append to as they go
    (``dead-letters-*.jsonl``), so a worker killed mid-run still has its dead letters
    counted."""
    found: list[str] = []
    for path in sorted(raw.glob("dead-letters-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                found.append(str(json.loads(line)["to"]))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill: its job was never dead-lettered
    return found


def generator_health(locust: dict[str, Any]) -> dict[str, Any]:
    samples = [float(s) for s in locust.get("cpu_samples", [])]
    busy = sum(1 for s in samples if s >= GENERATOR_BOUND_CPU)
    return {
        "cpu_mean_pct": round(sum(samples) / len(samples), 1) if samples else None,
        "cpu_max_pct": round(max(samples), 1) if samples else None,
        "seconds_above_90pct": busy,
        "cpu_warnings": int(locust.get("cpu_warnings", 0)),
        # Locust's own CPU warning suffices; without one, a quarter of the seconds above 90%.
        "bound": bool(locust.get("cpu_warnings")) or (bool(samples) and busy > len(samples) / 4),
        **{k: int(v) for k, v in locust.get("counters", {}).items()},
    }


def generator_notes(locust: dict[str, Any]) -> list[str]:
    health = generator_health(locust)
    if not health["bound"]:
        return []
    return [
        f"generator-bound: the load generator's CPU reached {health['cpu_max_pct']}% "
        f"({health['seconds_above_90pct']} s above 90%), so these latencies include its own "
        "queueing; rerun with more Locust processes (--locust-procs N) or on another host"
    ]


def ceiling_notes(histograms: dict[str, Any]) -> list[str]:
    """A note per metric with values clamped at the histograms' ceiling: its maximum and
    top percentiles then understate them."""
    notes = []
    for name, histogram in sorted(histograms.items()):
        if count := clamped(histogram):
            values = "value" if count == 1 else "values"
            notes.append(
                f"{name}: {count:,} {values} of an hour or more, recorded as "
                f"{HIGHEST_US / 3.6e9:g} h (the histograms' ceiling)"
            )
    return notes


def open_model_notes(
    locust: dict[str, Any], histograms: dict[str, Any], timeseries: list[TimeseriesRow]
) -> list[str]:
    counters = locust.get("counters", {})
    scheduled = int(counters.get("scheduled_starts", 0))
    if not scheduled:
        return []
    late = int(counters.get("late_starts", 0))
    dropped = int(counters.get("dropped_starts", 0))
    unfinished = max(0, scheduled - dropped - int(counters.get("completed_starts", 0)))
    notes = [
        f"open model: {scheduled:,} visits scheduled; {late:,} started late (> 10 ms after "
        f"schedule), {dropped:,} dropped, {unfinished:,} unfinished at the end"
    ]
    for name in ("send", "form"):
        service, intended = histograms.get(name), histograms.get(f"{name}_intended")
        if service is None or intended is None:
            continue
        s, i = Summary.of(service), Summary.of(intended)
        trend = _trend(timeseries, f"{name}_intended")
        service_trend = _trend(timeseries, name)
        text = (
            f"{name}: p99 from intended start {i.p99_us / 1e6:.3g} s vs service time "
            f"{s.p99_us / 1e6:.3g} s"
        )
        if trend is not None and service_trend is not None:
            text += (
                f"; over the run the median from intended start went from {trend[0] / 1e3:,.1f} "
                f"to {trend[1] / 1e3:,.1f} ms while service time went from "
                f"{service_trend[0] / 1e3:,.1f} to {service_trend[1] / 1e3:,.1f} ms"
            )
            if trend[1] > 2 * trend[0] and trend[1] - trend[0] > 100_000:
                text += " — the mode cannot keep up with this rate: the backlog keeps growing"
        notes.append(text)
    return notes


def _trend(rows: list[TimeseriesRow], metric: str) -> tuple[float, float] | None:
    """Median of the per-second p50 in the first and the last third of the run."""
    values = sorted((r.second, p50) for r in rows if r.metric == metric and (p50 := r.p50_us))
    if len(values) < 6:
        return None
    third = len(values) // 3
    first = sorted(v for _, v in values[:third])
    last = sorted(v for _, v in values[-third:])
    return float(first[len(first) // 2]), float(last[len(last) // 2])


def timeseries_rows(
    mode: str, locust: dict[str, Any], depths: dict[str, int | None]
) -> list[TimeseriesRow]:
    """Per second: a row per metric the load generator measured or saw fail (no p50, p99
    in a second of failures only), and a ``queue`` row when the depth was sampled."""
    seconds_data = locust.get("seconds", {})
    errors_data = locust.get("errors_per_second", {})
    seconds = sorted({*seconds_data, *errors_data, *depths}, key=int)
    rows: list[TimeseriesRow] = []
    if not seconds:
        return rows
    first = int(seconds[0])
    for second in seconds:
        histograms = seconds_data.get(second, {})
        errors = errors_data.get(second, {})
        at = int(second) - first
        for metric in sorted({*histograms, *errors}):
            summary = Summary.of(decode(histograms[metric])) if metric in histograms else None
            rows.append(
                TimeseriesRow(
                    mode,
                    at,
                    metric,
                    requests=summary.count if summary else 0,
                    errors=int(errors.get(metric, 0)),
                    p50_us=summary.p50_us if summary else None,
                    p99_us=summary.p99_us if summary else None,
                )
            )
        depth = depths.get(second)
        if depth is not None:
            rows.append(TimeseriesRow(mode, at, "queue", queue_depth=depth))
    return rows
