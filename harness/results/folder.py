"""The results folder: the contract that reports, notebooks and the CI gate read.

``results/<run-id>/`` holds ``manifest.json``, ``summary.csv``, ``accounting.csv``,
``timeseries.csv``, ``hdr/<mode>/<metric>.hdr`` (base64 HdrHistograms), ``charts/`` and
``report.md``. Everything a chart shows can be rebuilt from these files alone.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

from harness.errors import ResultsError
from harness.results.accounting import COLUMNS as ACCOUNTING_COUNTS
from harness.results.accounting import Accounting
from servers.metrics import Summary, decode, encode, new_histogram

METRICS = (
    "form",
    "send",
    "api",
    "delivery",
    "queue_wait",
    "render",
    "form_intended",
    "send_intended",
)
SUMMARY_COLUMNS = (
    "mode",
    "metric",
    "count",
    "errors",
    "rate_per_s",
    "mean_us",
    "p50_us",
    "p90_us",
    "p99_us",
    "p999_us",
    "max_us",
)
ACCOUNTING_COLUMNS = ("mode", *ACCOUNTING_COUNTS)
# One row per step of a load sweep (``--profile full``), in sweep.csv.
SWEEP_COLUMNS = (
    "mode", "step", "offered_per_s", "throughput_per_s", "errors_pct",
    "form_p50_us", "form_p99_us", "send_p50_us", "send_p99_us",
    "form_service_p99_us", "send_service_p99_us", "late_starts", "dropped_starts", "knee",
)  # fmt: skip
TIMESERIES_COLUMNS = (
    "mode",
    "second",
    "metric",
    "requests",
    "errors",
    "p50_us",
    "p99_us",
    "queue_depth",
)


@dataclass(slots=True)
class ModeResult:
    """Everything measured for one mode of the reference server."""

    mode: str
    duration_s: float
    histograms: dict[str, HdrHistogram]
    errors: dict[str, int]
    accounting: Accounting
    timeseries: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    generator: dict[str, Any] = field(default_factory=dict)  # the load generator's health
    sweep: list[dict[str, Any]] = field(default_factory=list)  # per load step, to the knee

    def summary_rows(self) -> list[dict[str, Any]]:
        rows = []
        for metric in METRICS:
            histogram = self.histograms.get(metric)
            errors = self.errors.get(metric, 0)
            if histogram is None and not errors:
                continue
            summary = Summary.of(histogram if histogram is not None else new_histogram())
            rate = summary.count / self.duration_s if self.duration_s > 0 else 0.0
            rows.append(
                {
                    "mode": self.mode,
                    "metric": metric,
                    "count": summary.count,
                    "errors": errors,
                    "rate_per_s": round(rate, 2),
                    "mean_us": summary.mean_us,
                    "p50_us": summary.p50_us,
                    "p90_us": summary.p90_us,
                    "p99_us": summary.p99_us,
                    "p999_us": summary.p999_us,
                    "max_us": summary.max_us,
                }
            )
        return rows


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})


def write_results(run_dir: Path, results: Sequence[ModeResult]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_csv(
        run_dir / "summary.csv", SUMMARY_COLUMNS, (r for m in results for r in m.summary_rows())
    )
    write_csv(
        run_dir / "accounting.csv",
        ACCOUNTING_COLUMNS,
        ({"mode": m.mode, **m.accounting.as_row()} for m in results),
    )
    write_csv(
        run_dir / "timeseries.csv", TIMESERIES_COLUMNS, (r for m in results for r in m.timeseries)
    )
    if any(m.sweep for m in results):
        write_csv(run_dir / "sweep.csv", SWEEP_COLUMNS, (r for m in results for r in m.sweep))
    for m in results:
        folder = run_dir / "hdr" / m.mode
        folder.mkdir(parents=True, exist_ok=True)
        for metric, histogram in m.histograms.items():
            (folder / f"{metric}.hdr").write_text(encode(histogram) + "\n")


def write_manifest(run_dir: Path, manifest: Mapping[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def point_latest(run_dir: Path) -> None:
    """Make ``<results>/latest`` a relative symlink to ``run_dir`` (atomically)."""
    latest = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, latest)


@dataclass(slots=True)
class Run:
    """A results folder read back: what report, compare and the notebook work from."""

    path: Path
    manifest: dict[str, Any]
    summary: list[dict[str, Any]]
    accounting: list[dict[str, Any]]
    timeseries: list[dict[str, Any]]
    histograms: dict[tuple[str, str], HdrHistogram]
    sweep: list[dict[str, Any]] = field(default_factory=list)

    @property
    def modes(self) -> list[str]:
        seen: list[str] = []
        for row in self.summary:
            if row["mode"] not in seen:
                seen.append(row["mode"])
        return seen

    def row(self, mode: str, metric: str) -> dict[str, Any] | None:
        return next((r for r in self.summary if r["mode"] == mode and r["metric"] == metric), None)

    def gap(self, mode: str) -> float | None:
        """The headline figure: ``send p50 / form p50``."""
        send, form = self.row(mode, "send"), self.row(mode, "form")
        if not send or not form or not form["p50_us"]:
            return None
        return float(send["p50_us"]) / float(form["p50_us"])


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key, value in row.items():
            row[key] = _number(value)
    return rows


def _number(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def load_run(path: Path) -> Run:
    path = Path(path)
    if path.is_symlink() or path.name == "latest":
        path = path.resolve()
    required = ("manifest.json", "summary.csv", "accounting.csv")
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        raise ResultsError(
            f"{path} is not a mailbench results folder: missing {', '.join(missing)}"
        )
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        summary = _read_csv(path / "summary.csv")
        accounting = _read_csv(path / "accounting.csv")
        ts_path = path / "timeseries.csv"
        timeseries = _read_csv(ts_path) if ts_path.is_file() else []
        sweep_path = path / "sweep.csv"
        sweep = _read_csv(sweep_path) if sweep_path.is_file() else []
        histograms = {
            (f.parent.name, f.stem): decode(f.read_text().strip())
            for f in sorted((path / "hdr").glob("*/*.hdr"))
        }
    except (ValueError, OSError) as exc:
        raise ResultsError(f"{path} has a file that does not parse: {exc}") from exc
    return Run(path, manifest, summary, accounting, timeseries, histograms, sweep)
