"""The rows of a results folder's CSV files, typed on both sides of the file.

Each file is a :class:`Table`: its name, its columns in order (the contract that reports,
notebooks and CI read) and the frozen dataclass one line holds. The writer and
:func:`~harness.results.folder.load_run` go through the same table, so a row read back
equals the row written, and a folder that does not parse fails once, in ``load_run``, with
a :class:`~harness.errors.ResultsError` naming the file, the line and the column.

How a cell is written and read follows the field's type:

* ``str``; ``int`` and ``float`` as Python prints them (``755199``, ``4.1``);
* ``bool`` as ``True`` / ``False`` (``true``, ``1``, ``false``, ``0`` are read too);
* ``X | None``: an empty cell is ``None`` (a second without a queue depth, or without a p99);
* a dataclass field (:class:`AccountingRow`'s counts) spreads over its own fields' columns.

A column may be missing from a file only when its field has a default (folders written
before the column existed); any other missing column is an error. Extra columns are ignored.
"""

from __future__ import annotations

import csv
import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from harness.errors import ResultsError
from harness.results.accounting import COLUMNS as ACCOUNTING_COUNTS
from harness.results.accounting import Accounting

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
# One row per step of a load sweep (``--profile full``), in sweep.csv.
SWEEP_COLUMNS = (
    "mode", "step", "offered_per_s", "throughput_per_s", "errors_pct",
    "form_p50_us", "form_p99_us", "send_p50_us", "send_p99_us",
    "form_service_p99_us", "send_service_p99_us", "late_starts", "dropped_starts", "knee",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class SummaryRow:
    """summary.csv: one mode's one metric over the whole run; latencies in µs."""

    mode: str
    metric: str
    count: int  # successful requests (the histogram's samples)
    errors: int  # failed requests, not in the latencies
    rate_per_s: float  # successes per second of the mode's run
    mean_us: float
    p50_us: int
    p90_us: int
    p99_us: int
    p999_us: int
    max_us: int

    def us_at(self, percentile: float) -> int:
        """The latency at ``percentile``: 50, 90, 99, 99.9 or 100 (the max)."""
        at = {50.0: self.p50_us, 90.0: self.p90_us, 99.0: self.p99_us, 99.9: self.p999_us}
        return self.max_us if percentile == 100.0 else at[percentile]


@dataclass(frozen=True, slots=True)
class AccountingRow:
    """accounting.csv: one mode's :class:`~harness.results.accounting.Accounting`."""

    mode: str
    counts: Accounting


@dataclass(frozen=True, slots=True)
class TimeseriesRow:
    """timeseries.csv: one second of one mode, for one metric of the load generator, or
    (metric ``queue``) the queue's depth sampled in that second. A blank is ``None``."""

    mode: str
    second: int  # since the mode's load started
    metric: str
    requests: int | None = None
    errors: int | None = None
    p50_us: int | None = None  # None: no request of the metric answered in the second
    p99_us: int | None = None
    queue_depth: int | None = None  # only on ``queue`` rows

    def us_at(self, percentile: float) -> int | None:
        """The second's p50 or p99 (``percentile`` 50 or 99)."""
        return {50.0: self.p50_us, 99.0: self.p99_us}[percentile]


@dataclass(frozen=True, slots=True)
class SweepRow:
    """sweep.csv: one step of the load sweep; latencies from intended start but the
    ``*_service_*`` ones, in µs (0: none measured)."""

    mode: str
    step: int
    offered_per_s: float
    throughput_per_s: float  # visits served per second
    errors_pct: float
    form_p50_us: int
    form_p99_us: int
    send_p50_us: int
    send_p99_us: int
    form_service_p99_us: int
    send_service_p99_us: int
    late_starts: int
    dropped_starts: int
    knee: bool  # the step where the mode broke; the sweep stopped there


if TYPE_CHECKING:
    from _typeshed import DataclassInstance

R = TypeVar("R", bound="DataclassInstance")
Leaf = tuple[str, Any, Any]  # (column, type, default) of one cell


@dataclass(frozen=True, slots=True)
class Table(Generic[R]):
    """One CSV file of the folder: its name, its columns in order and the row it holds."""

    file: str
    columns: tuple[str, ...]
    row: type[R]

    def __post_init__(self) -> None:
        fields = tuple(name for name, _kind, _default in _leaves(self.row))
        if fields != self.columns:
            raise TypeError(f"{self.row.__name__} has fields {fields}, {self.file} {self.columns}")

    def write(self, path: Path, rows: Iterable[R]) -> None:
        with path.open("w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(self.columns)
            writer.writerows(record(row).values() for row in rows)

    def read(self, path: Path) -> list[R]:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            try:
                header = reader.fieldnames or []
                for name, _kind, default in _leaves(self.row):
                    if name not in header and default is dataclasses.MISSING:
                        raise ResultsError(f"{path}: no column {name!r} (its header: {header})")
                return [
                    _build(self.row, cells, f"{path}, line {reader.line_num}") for cells in reader
                ]
            except csv.Error as exc:
                raise ResultsError(f"{path}, line {reader.line_num}: {exc}") from exc


def record(row: DataclassInstance) -> dict[str, Any]:
    """A row's cells by column, in the file's order (nested dataclasses spread out): what
    a line of the file holds, and what a pandas ``DataFrame`` is made from."""
    cells: dict[str, Any] = {}
    for field in dataclasses.fields(row):
        value = getattr(row, field.name)
        nested = dataclasses.is_dataclass(value) and not isinstance(value, type)
        cells |= record(value) if nested else {field.name: value}
    return cells


@cache
def _hints(row: type[DataclassInstance]) -> dict[str, Any]:
    return typing.get_type_hints(row)


def _dataclass(kind: Any) -> type[DataclassInstance] | None:
    return kind if isinstance(kind, type) and dataclasses.is_dataclass(kind) else None


def _leaves(row: type[DataclassInstance]) -> list[Leaf]:
    """(column, type, default) of every cell of ``row``, nested dataclasses spread out."""
    leaves: list[Leaf] = []
    for field in dataclasses.fields(row):
        kind = _hints(row)[field.name]
        if nested := _dataclass(kind):
            leaves += _leaves(nested)
        else:
            leaves.append((field.name, kind, field.default))
    return leaves


def _build(row: type[R], cells: Mapping[str, str | None], where: str) -> R:
    values: dict[str, Any] = {}
    for field in dataclasses.fields(row):
        kind = _hints(row)[field.name]
        if nested := _dataclass(kind):
            values[field.name] = _build(nested, cells, where)
        elif field.name in cells:  # else the field's default (checked against the header)
            values[field.name] = _cell(kind, cells[field.name], f"{where}, column {field.name!r}")
    return row(**values)


_TRUE, _FALSE = ("true", "1"), ("false", "0")
_WHAT = {int: "a whole number", float: "a number", bool: "True or False"}


def _cell(kind: Any, text: str | None, where: str) -> Any:
    if text is None:
        raise ResultsError(f"{where}: the line ends before this column")
    if isinstance(kind, types.UnionType):  # ``int | None``: blank is None
        if text == "":
            return None
        (kind,) = (k for k in typing.get_args(kind) if k is not type(None))
    if kind is str:
        return text
    if kind is bool:
        if text.strip().lower() in (*_TRUE, *_FALSE):
            return text.strip().lower() in _TRUE
    else:
        try:
            return kind(text)
        except ValueError:
            pass
    raise ResultsError(f"{where}: {text!r} is not {_WHAT[kind]}")


# The folder's CSV files (their columns are checked against the rows' fields here).
SUMMARY = Table("summary.csv", SUMMARY_COLUMNS, SummaryRow)
ACCOUNTING = Table("accounting.csv", ACCOUNTING_COLUMNS, AccountingRow)
TIMESERIES = Table("timeseries.csv", TIMESERIES_COLUMNS, TimeseriesRow)
SWEEP = Table("sweep.csv", SWEEP_COLUMNS, SweepRow)
