"""Turn what one mode's processes wrote into a :class:`~harness.results.folder.ModeResult`.

Inputs, all under ``raw/<mode>/``: ``locust-hdr-*.jsonl`` (each Locust process's journal
of chunks: µs histograms, per second too, open-model counters, its CPU, the sends it saw;
read and merged by :func:`read_locust`) and ``locust-hdr.json`` (when Locust started and
stopped), ``server*.json`` (each server
process's ``api`` and ``render`` histograms), ``worker-*.json`` (``api`` and the other
outcomes of API calls, ``queue_wait``, ``render``), ``dead-letters-*.jsonl`` (what
workers dead-lettered, as they went), ``depth.json`` (queue depth sampled once a second)
and the fake Mailgun's ledger.
Percentiles are only ever taken from merged histograms.

The figures are the main phase's, after its warm-up: the server and worker files in
``raw/<mode>/`` itself hold that phase's histograms (the warm-up's are in ``warmup/``, a
sweep step's in its own folder; see :mod:`servers.phases`), and the delivery lag is that
of the main load's sends posted after the warm-up, those its ``send`` row counts. The
accounting covers every send of every phase.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

from harness.errors import ResultsError
from harness.results.accounting import reconcile
from harness.results.folder import ModeResult
from harness.results.rows import TimeseriesRow
from servers.metrics import HIGHEST_US, Recorder, Summary, clamped

GENERATOR_BOUND_CPU = 90.0  # percent of one core, as Locust's own cpu_warning
LOCUST_FILE = "locust-hdr.json"  # written by the Locust master (or single process) at quit
LOCUST_JOURNALS = "locust-hdr-*.jsonl"  # one per Locust process, a chunk a line
# The histograms taken from server processes (API calls by outcome: SendResult.metric,
# and renders), and from workers (those, and first claims).
_API = frozenset({"api", "api_rate_limited", "api_retryable", "api_failed"})
_SERVER = _API | {"render"}
_WORKER = _API | {"queue_wait", "render"}


def collect_mode(
    mode: str,
    raw: Path,
    duration: float,
    ledger: list[dict[str, Any]],
    notes: list[str],
    load_s: float = 0.0,
) -> ModeResult:
    """``duration``: the seconds the main load took, Locust's start-up and stop included;
    ``load_s``: the load asked for (its rates are per second of it, after the warm-up)."""
    locust = read_locust(raw)
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
    accounting, _ = reconcile(accepted, ledger, dead_lettered_recipients(raw), failed)
    # Judged on the requests of the summary's window: most of them failed → not sound.
    errors = dict(locust.get("errors", {}))
    answered = {name: int(h.get_total_count()) for name, h in recorder.histograms.items()}
    accounting = accounting.with_requests(answered, errors)
    _, delivery = reconcile(main_phase_sends(locust), ledger)
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
        errors=errors,
        accounting=accounting,
        timeseries=timeseries,
        notes=notes,
        generator=generator_health(locust),
        warmup_s=float(locust.get("warmup_s", 0.0)),
        load_s=load_s,
    )


def main_phase_sends(locust: dict[str, Any]) -> list[tuple[str, float]]:
    """The accepted sends of one phase's Locust data that were posted after its warm-up
    (``first_request_at`` plus ``warmup_s``): the ones its ``send`` row counts."""
    first = locust.get("first_request_at")
    begins = -math.inf if first is None else float(first) + float(locust.get("warmup_s", 0.0))
    return [(str(r), float(at)) for r, at in locust.get("sends_ok", []) if float(at) >= begins]


def client_sends(raw: Path) -> tuple[list[tuple[str, float]], list[str]]:
    """The sends Locust saw accepted (recipient, when posted) and the others it attempted,
    over the main phase and every sweep step under ``raw``."""
    accepted: list[tuple[str, float]] = []
    failed: list[str] = []
    for folder in locust_folders(raw):
        locust = read_locust(folder)
        accepted += [(str(r), float(at)) for r, at in locust.get("sends_ok", [])]
        # A send started but never answered (cut short at the stop) was attempted too.
        failed += [str(r) for r in locust.get("sends_failed", [])]
        failed += [str(r) for r in locust.get("sends_started", [])]
    return accepted, failed


def locust_folders(raw: Path) -> list[Path]:
    """``raw`` and every folder under it that holds a Locust phase's files."""
    found = {p.parent for p in raw.rglob(LOCUST_FILE)} | {
        p.parent for p in raw.rglob(LOCUST_JOURNALS)
    }
    return sorted(found)


def read_locust(folder: Path) -> dict[str, Any]:
    """What every Locust process of one load phase wrote into ``folder``, merged into the
    shape of one chunk (:mod:`scenarios.record`): histograms added (never percentiles
    averaged), per-second histograms added second by second, counts summed, lists
    concatenated, each chunk once however many journals hold it. Plus
    ``first_request_at`` (the earliest process's), ``processes`` (how many wrote) and,
    from ``locust-hdr.json``, ``started_at`` and ``stopped_at``.

    In folders written before the journals, ``locust-hdr.json`` held the whole run, merged
    by the master; it is read as one chunk."""
    chunks: list[dict[str, Any]] = []
    marker: dict[str, Any] = {}
    path = folder / LOCUST_FILE
    try:
        if path.is_file():
            marker = json.loads(path.read_text())
            chunks.append(marker)  # only times now; the whole run in older folders
        for journal in sorted(folder.glob(LOCUST_JOURNALS)):
            for line in journal.read_text().splitlines():
                try:
                    chunk = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill: the chunks before it count
                if isinstance(chunk, dict):
                    chunks.append(chunk)
    except (OSError, ValueError) as exc:
        raise ResultsError(f"{folder}: a Locust file does not read: {exc}") from exc
    if not chunks and not marker:
        raise ResultsError(f"{folder} holds no Locust results ({LOCUST_FILE}, {LOCUST_JOURNALS})")
    merged = merge_chunks(chunks)
    merged.update({k: marker[k] for k in ("started_at", "stopped_at") if k in marker})
    return merged


def merge_chunks(chunks: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Chunks of any processes as one (see :func:`read_locust`)."""
    unique: list[dict[str, Any]] = []
    seen: set[str] = set()
    for chunk in chunks:
        key = chunk.get("id")
        if key is not None:
            if key in seen:
                continue  # shipped to the master and journaled by its process too
            seen.add(str(key))
        unique.append(chunk)
    # Each process counts its seconds from its own first request; the merge counts them
    # from the earliest one.
    firsts: dict[str, float] = {}
    for chunk in unique:
        if (at := chunk.get("first_request_at")) is not None:
            process = str(chunk.get("process", ""))
            firsts[process] = min(float(at), firsts.get(process, math.inf))
    first = min(firsts.values(), default=None)
    total = Recorder()
    seconds: defaultdict[int, dict[str, HdrHistogram]] = defaultdict(dict)
    errors: Counter[str] = Counter()
    errors_per_second: defaultdict[int, Counter[str]] = defaultdict(Counter)
    counters: Counter[str] = Counter()
    merged: dict[str, Any] = {"cpu_samples": [], "cpu_warnings": 0, "sends_ok": [],
                              "sends_failed": [], "sends_started": []}  # fmt: skip
    for chunk in unique:
        process_first = firsts.get(str(chunk.get("process", "")))
        shift = (
            round(process_first - first) if process_first is not None and first is not None else 0
        )
        total.add_encoded(chunk.get("histograms", {}))
        for second, encoded in chunk.get("seconds", {}).items():
            into = seconds[int(second) + shift]
            for name, blob in encoded.items():
                histogram = HdrHistogram.decode(blob)  # at the precision it was kept
                if name in into:
                    into[name].add(histogram)
                else:
                    into[name] = histogram
        errors.update(chunk.get("errors", {}))
        for second, counts in chunk.get("errors_per_second", {}).items():
            errors_per_second[int(second) + shift].update(counts)
        counters.update(chunk.get("counters", {}))
        merged["cpu_warnings"] += int(chunk.get("cpu_warnings", 0))
        for key in ("cpu_samples", "sends_ok", "sends_failed", "sends_started"):
            merged[key] += chunk.get(key, [])
    merged.update(
        histograms=total.encoded(),
        seconds={
            str(s): {n: h.encode().decode("ascii") for n, h in hs.items()}
            for s, hs in sorted(seconds.items())
        },
        errors=dict(errors),
        errors_per_second={str(s): dict(e) for s, e in sorted(errors_per_second.items())},
        counters=dict(counters),
        first_request_at=first,
        warmup_s=max((float(c.get("warmup_s", 0.0)) for c in unique), default=0.0),
        processes=len({c["process"] for c in unique if "process" in c}),
    )
    return merged


def framework_worker(raw: Path) -> dict[str, Any] | None:
    """How a framework mode's workers ran (framework, configuration, pool, command line),
    as the first worker's metrics file says; None for mailbench's own workers."""
    for path in sorted(raw.glob("worker-*.json")):
        try:
            described = json.loads(path.read_text()).get("framework")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(described, dict):
            return described
    return None


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
        f"schedule), {dropped:,} dropped, {unfinished:,} unfinished at the end (the requests "
        "of these never answered are in the times from intended start, timed to the stop)"
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
    """Per second since the mode's first request: a row per metric the load generator
    measured or saw fail (no p50, p99 in a second of failures only), warm-up included, and
    a ``queue`` row when the depth was sampled (``depths`` by wall-clock time; samples
    before the first request are left out).

    Data without ``first_request_at`` (folders written before it) count seconds from the
    first second anything was recorded, by the wall clock."""
    seconds_data: dict[str, dict[str, str]] = locust.get("seconds", {})
    errors_data: dict[str, dict[str, int]] = locust.get("errors_per_second", {})
    first_request = locust.get("first_request_at")
    if first_request is not None:
        depth_at: dict[int, int | None] = {}
        for sampled, depth in sorted(depths.items(), key=lambda item: float(item[0])):
            since = math.floor(float(sampled) - float(first_request))
            if since >= 0:
                depth_at[since] = depth
        offset = 0
    else:
        depth_at = {int(float(sampled)): depth for sampled, depth in depths.items()}
        known = [int(s) for s in (*seconds_data, *errors_data)] + list(depth_at)
        offset = min(known, default=0)
    seconds = sorted({*map(int, seconds_data), *map(int, errors_data), *depth_at})
    rows: list[TimeseriesRow] = []
    for second in seconds:
        histograms = seconds_data.get(str(second), {})
        errors = errors_data.get(str(second), {})
        at = second - offset
        for metric in sorted({*histograms, *errors}):
            summary = (
                Summary.of(HdrHistogram.decode(histograms[metric]))
                if metric in histograms
                else None
            )
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
        depth = depth_at.get(second)
        if depth is not None:
            rows.append(TimeseriesRow(mode, at, "queue", queue_depth=depth))
    return rows
