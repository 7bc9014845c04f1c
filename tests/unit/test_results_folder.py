"""The results folder typed on both sides: what the writer puts in, ``load_run`` gives back
as the same rows; the files keep their format; a folder that does not parse says which
file, line and column."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import ResultsError
from harness.results.accounting import Accounting
from harness.results.folder import Layout, ModeResult, load_run, write_manifest, write_results
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
from servers.metrics import new_histogram, record_us

SAMPLE = Path(__file__).resolve().parents[2] / "results" / "sample"


def sweep_step(mode: str, step: int, knee: bool) -> SweepRow:
    """A step as :func:`harness.run.sweep.sweep_mode` gives it."""
    return SweepRow(
        mode=mode, step=step, offered_per_s=25.0 * 2**step, throughput_per_s=24.9,
        errors_pct=0.25, form_p50_us=900, form_p99_us=2_000 * 10**step,
        send_p50_us=1_500, send_p99_us=0, form_service_p99_us=1_800,
        send_service_p99_us=0, late_starts=3, dropped_starts=0, knee=knee,
    )  # fmt: skip


def results() -> list[ModeResult]:
    out = []
    for mode, base in (("direct", 750_000), ("redis", 400)):
        histograms = {"form": new_histogram(), "send": new_histogram()}
        for i in range(1, 200):
            record_us(histograms["form"], 1_000 + i * 7)
            record_us(histograms["send"], base + i * 13)
        timeseries = [
            TimeseriesRow(mode, 0, "form", requests=120, errors=0, p50_us=1_300, p99_us=2_100),
            TimeseriesRow(mode, 1, "send", requests=0, errors=2),  # failures only: no p50
        ]
        if mode == "redis":
            timeseries.append(TimeseriesRow(mode, 1, "queue", queue_depth=7))
        out.append(
            ModeResult(
                mode=mode,
                duration_s=12.5,
                histograms=histograms,
                errors={"send": 2, "api": 1},  # api: failures only, no histogram
                accounting=Accounting(199, 197, 1, 1, 1, 0, 2),
                timeseries=timeseries,
                sweep=[sweep_step(mode, 0, False), sweep_step(mode, 1, True)],
            )
        )
    return out


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    write_manifest(tmp_path / "run", {"run_id": "run", "config": {"modes": ["direct", "redis"]}})
    write_results(tmp_path / "run", results())
    return tmp_path / "run"


def test_a_folder_read_back_gives_the_rows_written(folder: Path) -> None:
    written = results()
    run = load_run(folder)
    assert run.summary == [row for m in written for row in m.summary_rows()]
    assert run.accounting == [AccountingRow(m.mode, m.accounting) for m in written]
    assert run.timeseries == [row for m in written for row in m.timeseries]
    assert run.sweep == [row for m in written for row in m.sweep]
    assert [r.knee for r in run.sweep] == [False, True, False, True]  # real bools
    assert run.modes == ["direct", "redis"]
    assert run.row("redis", "api") == SummaryRow("redis", "api", 0, 1, 0.0, 0.0, 0, 0, 0, 0, 0)
    assert run.row("redis", "nothing") is None
    assert run.accounting_of("redis") == Accounting(199, 197, 1, 1, 1, 0, 2)
    assert run.accounting_of("sqlite") is None
    send, form = run.row("direct", "send"), run.row("direct", "form")
    assert send is not None and form is not None
    assert run.gap("direct") == send.p50_us / form.p50_us > 100
    assert {k: h.get_total_count() for k, h in run.histograms.items()} == {
        (m, metric): 199 for m in ("direct", "redis") for metric in ("form", "send")
    }


def test_the_files_keep_their_columns_and_number_formats(folder: Path) -> None:
    layout = Layout(folder)
    summary = layout.summary.read_text().splitlines()
    assert summary[0] == (
        "mode,metric,count,errors,rate_per_s,mean_us,p50_us,p90_us,p99_us,p999_us,max_us"
    )
    assert "direct,api,0,1,0.0,0.0,0,0,0,0,0" in summary
    assert layout.accounting.read_text() == (
        "mode,accepted,delivered,duplicates,dead_lettered,lost,unexpected,unacknowledged,"
        "requests,failed_requests\n"
        "direct,199,197,1,1,1,0,2,0,0\nredis,199,197,1,1,1,0,2,0,0\n"
    )
    assert layout.timeseries.read_text().splitlines()[-3:] == [
        "redis,0,form,120,0,1300,2100,",
        "redis,1,send,0,2,,,",
        "redis,1,queue,,,,,7",
    ]
    assert layout.sweep.read_text().splitlines()[:2] == [
        "mode,step,offered_per_s,throughput_per_s,errors_pct,form_p50_us,form_p99_us,"
        "send_p50_us,send_p99_us,form_service_p99_us,send_service_p99_us,late_starts,"
        "dropped_starts,knee",
        "direct,0,25.0,24.9,0.25,900,2000,1500,0,1800,0,3,0,False",
    ]


def test_the_committed_sample_rewritten_from_its_rows_is_the_same_bytes(tmp_path: Path) -> None:
    run = load_run(SAMPLE)
    out = Layout(tmp_path)
    SUMMARY.write(out.summary, run.summary)
    ACCOUNTING.write(out.accounting, run.accounting)
    TIMESERIES.write(out.timeseries, run.timeseries)
    for name in ("summary.csv", "accounting.csv", "timeseries.csv"):
        assert (tmp_path / name).read_bytes() == (SAMPLE / name).read_bytes(), name
    blank = [r for r in run.timeseries if r.metric == "queue"]
    assert blank and all(r.p99_us is None and r.queue_depth is not None for r in blank)


def test_a_folder_without_a_sweep_reads_an_empty_one(tmp_path: Path) -> None:
    plain = [ModeResult("direct", 1.0, {}, {}, Accounting(0, 0, 0, 0, 0, 0))]
    write_manifest(tmp_path, {})
    write_results(tmp_path, plain)
    assert not Layout(tmp_path).sweep.exists()
    run = load_run(tmp_path)
    assert run.sweep == [] and run.summary == [] and run.timeseries == []


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(
    ("file", "old", "new", "message"),
    [
        ("summary.csv", ",p50_us,", ",median,", r"summary\.csv: no column 'p50_us'"),
        ("summary.csv", "direct,form,199,", "direct,form,many,",
         r"summary\.csv, line 2, column 'count': 'many' is not a whole number"),
        ("summary.csv", "direct,form,199,0,15.92,", "direct,form,199,0,fast,",
         r"summary\.csv, line 2, column 'rate_per_s': 'fast' is not a number"),
        ("accounting.csv", "redis,199,197,1,1,1,0,2", "redis,199,197,1,1,,0,2",
         r"accounting\.csv, line 3, column 'lost': '' is not a whole number"),
        ("accounting.csv", ",lost,", ",missing,", r"accounting\.csv: no column 'lost'"),
        ("timeseries.csv", "redis,1,queue,,,,,7", "redis,1,queue,,,,,seven",
         r"timeseries\.csv, line \d+, column 'queue_depth': 'seven' is not a whole number"),
        ("timeseries.csv", "redis,1,queue,,,,,7", "redis,1,queue",
         r"timeseries\.csv, line \d+, column 'requests': the line ends before this column"),
        ("sweep.csv", "0,3,0,True", "0,3,0,maybe",
         r"sweep\.csv, line 3, column 'knee': 'maybe' is not True or False"),
    ],
)  # fmt: skip
def test_a_malformed_folder_names_the_file_and_the_column(
    folder: Path, file: str, old: str, new: str, message: str
) -> None:
    edit(folder / file, old, new)
    with pytest.raises(ResultsError, match=message) as raised:
        load_run(folder)
    assert str(folder / file) in str(raised.value)


def test_a_column_added_later_may_be_missing_from_an_older_folder(folder: Path) -> None:
    """``unacknowledged``, ``requests`` and ``failed_requests`` (default 0) came after the
    first folders were written."""
    lines = (folder / "accounting.csv").read_text().splitlines()
    (folder / "accounting.csv").write_text(
        "".join(",".join(line.split(",")[:-3]) + "\n" for line in lines)
    )
    assert load_run(folder).accounting_of("direct") == Accounting(199, 197, 1, 1, 1, 0, 0)


def test_knee_reads_the_spellings_of_a_bool(folder: Path) -> None:
    edit(folder / "sweep.csv", "0,3,0,True", "0,3,0,true")
    edit(folder / "sweep.csv", "0,3,0,False", "0,3,0,0")
    assert [r.knee for r in load_run(folder).sweep] == [False, True, False, True]


def test_every_table_matches_its_row() -> None:
    for table, row in ((SUMMARY, SummaryRow), (TIMESERIES, TimeseriesRow), (SWEEP, SweepRow)):
        assert table.row is row
    with pytest.raises(TypeError, match="fields"):
        type(SUMMARY)("summary.csv", ("mode", "metric"), SummaryRow)
