"""The results folder: the contract that reports, notebooks and the CI gate read.

``results/<run-id>/`` holds ``manifest.json``, ``summary.csv``, ``accounting.csv``,
``timeseries.csv``, ``sweep.csv`` (with ``--profile full``), ``hdr/<mode>/<metric>.hdr``
(base64 HdrHistograms), ``charts/`` and ``report.md``. Everything a chart shows can be
rebuilt from these files alone. Where each file lives is :class:`Layout`; what each CSV
line holds, :mod:`harness.results.rows`. The writer (:func:`write_results`) and the
reader (:func:`load_run`) share both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hdrh.histogram import HdrHistogram

from harness.errors import ResultsError
from harness.results.accounting import Accounting
from harness.results.rows import (
    ACCOUNTING,
    SUMMARY,
    SWEEP,
    TIMESERIES,
    AccountingRow,
    SummaryRow,
    SweepRow,
    TimeseriesRow,
)
from servers.metrics import Summary, decode, encode, new_histogram

METRICS = (
    "form",
    "send",
    "api",  # calls the API accepted; the others by what the API answered instead
    "api_rate_limited",
    "api_retryable",
    "api_failed",
    "delivery",
    "queue_wait",
    "render",
    "form_intended",
    "send_intended",
    "form_server",
    "send_server",
)


@dataclass(frozen=True, slots=True)
class Layout:
    """Where each file of one results folder lives: the one map that the writer and every
    reader use."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY.file

    @property
    def accounting(self) -> Path:
        return self.root / ACCOUNTING.file

    @property
    def timeseries(self) -> Path:
        return self.root / TIMESERIES.file

    @property
    def sweep(self) -> Path:
        return self.root / SWEEP.file

    @property
    def hdr(self) -> Path:
        return self.root / "hdr"

    def histogram(self, mode: str, metric: str) -> Path:
        return self.hdr / mode / f"{metric}.hdr"

    def histograms(self) -> list[tuple[str, str, Path]]:
        """(mode, metric, file) of every histogram in the folder, sorted."""
        return [(f.parent.name, f.stem, f) for f in sorted(self.hdr.glob("*/*.hdr"))]

    def chaos_events(self, mode: str) -> Path:
        """What ``mailbench chaos`` did to the mode (kills, restarts), as it happened."""
        return self.root / "raw" / mode / "chaos-events.json"

    @property
    def charts(self) -> Path:
        return self.root / "charts"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"


@dataclass(slots=True)
class ModeResult:
    """Everything measured for one mode of the reference server."""

    mode: str
    duration_s: float
    histograms: dict[str, HdrHistogram]
    errors: dict[str, int]
    accounting: Accounting
    timeseries: list[TimeseriesRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    generator: dict[str, Any] = field(default_factory=dict)  # the load generator's health
    # Per load step, to the knee (:func:`harness.run.sweep.sweep_mode`).
    sweep: list[SweepRow] = field(default_factory=list)
    warmup_s: float = 0.0  # the first seconds of the load, out of every figure
    # The load's own seconds (Locust's run time, without its start-up and stop, which
    # duration_s includes); 0: unknown, then duration_s.
    load_s: float = 0.0

    @property
    def window_s(self) -> float:
        """The seconds every figure counts: the load after its warm-up. The load
        generator, the servers and the workers leave the warm-up out alike (see
        servers.phases), and so does the delivery lag (of the sends after it)."""
        return (self.load_s or self.duration_s) - self.warmup_s

    def summary_rows(self) -> list[SummaryRow]:
        rows = []
        for metric in METRICS:
            histogram = self.histograms.get(metric)
            errors = self.errors.get(metric, 0)
            if histogram is None and not errors:
                continue
            summary = Summary.of(histogram if histogram is not None else new_histogram())
            seconds = self.window_s
            rate = summary.count / seconds if seconds > 0 else 0.0
            rows.append(
                SummaryRow(
                    mode=self.mode,
                    metric=metric,
                    count=summary.count,
                    errors=errors,
                    rate_per_s=round(rate, 2),
                    mean_us=summary.mean_us,
                    p50_us=summary.p50_us,
                    p90_us=summary.p90_us,
                    p99_us=summary.p99_us,
                    p999_us=summary.p999_us,
                    max_us=summary.max_us,
                )
            )
        return rows


def write_results(run_dir: Path, results: Sequence[ModeResult]) -> None:
    layout = Layout(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    SUMMARY.write(layout.summary, (r for m in results for r in m.summary_rows()))
    ACCOUNTING.write(layout.accounting, (AccountingRow(m.mode, m.accounting) for m in results))
    TIMESERIES.write(layout.timeseries, (r for m in results for r in m.timeseries))
    if any(m.sweep for m in results):
        SWEEP.write(layout.sweep, (r for m in results for r in m.sweep))
    for m in results:
        for metric, histogram in m.histograms.items():
            path = layout.histogram(m.mode, metric)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(encode(histogram) + "\n")


def write_manifest(run_dir: Path, manifest: Mapping[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    Layout(run_dir).manifest.write_text(text)


def point_latest(run_dir: Path) -> None:
    """Make ``<results>/latest`` a relative symlink to ``run_dir`` (atomically)."""
    latest = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, latest)


def host_port(url: str) -> str:
    """``host:port`` of a URL, without any user or password: the name of a target whose
    run was given no ``--target-label`` (and of every folder written before the label)."""
    parts = urlsplit(url)
    host = parts.hostname or parts.netloc
    if ":" in host:  # IPv6
        host = f"[{host}]"
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # not a number: the URL as written is all there is to say
        return parts.netloc.rpartition("@")[2] or url
    return f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class TargetInfo:
    """The server of a ``mailbench run --target URL`` run, from ``config.target`` in the
    manifest: the results' ``mode`` column holds its ``name``; ``label`` is what the
    reports call it (``--target-label``, else the URL's host:port)."""

    url: str
    name: str
    label: str

    @classmethod
    def of(cls, manifest: Mapping[str, Any]) -> TargetInfo | None:
        target = (manifest.get("config") or {}).get("target")
        if not isinstance(target, Mapping) or not target.get("url"):
            return None
        url = str(target["url"])
        label = target.get("label") or host_port(url)
        return cls(url=url, name=str(target.get("name") or "target"), label=str(label))


@dataclass(slots=True)
class Run:
    """A results folder read back: what report, compare and the notebook work from."""

    path: Path
    manifest: dict[str, Any]
    summary: list[SummaryRow]
    accounting: list[AccountingRow]
    timeseries: list[TimeseriesRow]
    histograms: dict[tuple[str, str], HdrHistogram]
    sweep: list[SweepRow] = field(default_factory=list)

    @property
    def layout(self) -> Layout:
        return Layout(self.path)

    @property
    def modes(self) -> list[str]:
        return list(dict.fromkeys(row.mode for row in self.summary))

    @property
    def target(self) -> TargetInfo | None:
        """The external server this run measured; None for a run of mailbench's modes."""
        return TargetInfo.of(self.manifest)

    def label_of(self, mode: str) -> str:
        """What reports and charts call a mode: the target's label for a ``--target``
        run's server, the mode's own name otherwise."""
        target = self.target
        return target.label if target is not None and mode == target.name else mode

    def row(self, mode: str, metric: str) -> SummaryRow | None:
        return next((r for r in self.summary if r.mode == mode and r.metric == metric), None)

    def accounting_of(self, mode: str) -> Accounting | None:
        """The mode's accounting; None when the mode has none (it did not finish)."""
        return next((r.counts for r in self.accounting if r.mode == mode), None)

    def gap(self, mode: str) -> float | None:
        """The headline figure: ``send p50 / form p50``."""
        send, form = self.row(mode, "send"), self.row(mode, "form")
        if not send or not form or not form.p50_us:
            return None
        return send.p50_us / form.p50_us


def load_run(path: Path) -> Run:
    """Read a results folder (or a ``latest`` link to one), every CSV line parsed once
    into its row; :class:`ResultsError` names the file, line and column that do not."""
    path = Path(path)
    if path.is_symlink() or path.name == "latest":
        path = path.resolve()
    layout = Layout(path)
    required = (layout.manifest, layout.summary, layout.accounting)
    missing = [p.name for p in required if not p.is_file()]
    if missing:
        raise ResultsError(
            f"{path} is not a mailbench results folder: missing {', '.join(missing)}"
        )
    try:
        manifest = json.loads(layout.manifest.read_text())
        summary = SUMMARY.read(layout.summary)
        accounting = ACCOUNTING.read(layout.accounting)
        timeseries = TIMESERIES.read(layout.timeseries) if layout.timeseries.is_file() else []
        sweep = SWEEP.read(layout.sweep) if layout.sweep.is_file() else []
        histograms = {
            (mode, metric): decode(f.read_text().strip()) for mode, metric, f in layout.histograms()
        }
    except (ValueError, OSError) as exc:
        raise ResultsError(f"{path} has a file that does not parse: {exc}") from exc
    return Run(path, manifest, summary, accounting, timeseries, histograms, sweep)
