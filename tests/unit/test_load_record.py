"""What one Locust process records (scenarios.record, without Locust): the warm-up, the
per-second timeline, times from intended start and the server's own time."""

from __future__ import annotations

import pytest

from harness.results.collect import merge_chunks, timeseries_rows
from scenarios.record import PER_SECOND_FIGURES, LoadRecord, Visit, server_time_us
from servers.metrics import SIGNIFICANT_FIGURES, Summary, decode

T0 = 2_000_000.0


def test_a_slow_cold_start_is_in_the_timeline_not_the_summary() -> None:
    record = LoadRecord("p", warmup_s=3.0)
    for tenth in range(100):  # 10 s, a send every 0.1 s; the first 3 s take 400 ms
        sent = T0 + tenth / 10
        took = 0.4 if sent < T0 + 3 else 0.004
        record.record("send", took * 1e6, sent, sent + took)
    merged = merge_chunks([record.chunk()])
    summary = Summary.of(decode(merged["histograms"]["send"]))
    assert summary.count == 70 and summary.max_us < 5_000
    rows = timeseries_rows("sqlite", merged, {})
    by_second = {r.second: r for r in rows if r.metric == "send"}
    assert sorted(by_second) == list(range(10))
    assert all((by_second[s].p99_us or 0) > 300_000 for s in (0, 1, 2))
    assert all((by_second[s].p99_us or 0) < 5_000 for s in range(4, 10))
    assert sum(r.requests or 0 for r in by_second.values()) == 100


def test_seconds_count_from_the_first_request_and_depth_is_aligned_to_it() -> None:
    record = LoadRecord("p")
    record.request_starting(T0 + 0.7)
    record.record("form", 150, T0 + 0.7, T0 + 0.7002)
    record.record("form", 150, T0 + 1.9, T0 + 1.9002)
    merged = merge_chunks([record.chunk()])
    depths = {f"{T0 + 0.2:.3f}": 9, f"{T0 + 1.0:.3f}": 1, f"{T0 + 1.8:.3f}": 2}
    rows = timeseries_rows("sqlite", merged, depths)
    assert [(r.second, r.metric, r.queue_depth) for r in rows] == [
        (0, "form", None),
        (0, "queue", 1),  # the sample before the first request is left out
        (1, "form", None),
        (1, "queue", 2),
    ]


def test_per_second_histograms_are_coarser_than_the_summary() -> None:
    record = LoadRecord("p")
    record.record("form", 150, T0, T0 + 0.001)
    histogram = record.per_second[0]["form"]
    summary = record.total.histograms["form"]
    assert (histogram.significant_figures, summary.significant_figures) == (
        PER_SECOND_FIGURES,
        SIGNIFICANT_FIGURES,
    )
    assert histogram.counts_len * 4 < summary.counts_len


def test_failed_requests_count_from_their_intended_start() -> None:
    record = LoadRecord("p")
    record.record("send", 2_000, T0, T0 + 0.002, failed=True, intended_us=5_000_000)
    merged = merge_chunks([record.chunk()])
    assert "send" not in merged["histograms"]  # service time: successes only
    assert merged["errors"] == {"send": 1}
    assert Summary.of(decode(merged["histograms"]["send_intended"])).max_us >= 4_990_000


def test_unanswered_visits_are_timed_to_the_stop() -> None:
    waiting = Visit(10.0, ("form", "send"))  # never got a slot (or was dropped)
    in_get = Visit(11.0, ("form", "send"))
    in_get.start(11.5)
    in_post = Visit(12.0, ("form", "send"))
    in_post.start(12.0)
    in_post.answered("form", 0.25)
    stop = 20.0
    assert list(waiting.unanswered(stop)) == [("form", 10.0), ("send", 10.0)]
    # The POST waits behind the GET: known only to be as late as the visit's start.
    assert list(in_get.unanswered(stop)) == [("form", 9.0), ("send", 0.5)]
    # The POST was due when the GET was answered, had the visit started on time.
    assert list(in_post.unanswered(stop)) == [("send", 7.75)]
    in_post.answered("send", 1.0)
    assert list(in_post.unanswered(stop)) == []


def test_an_overloaded_schedule_never_looks_better_for_what_it_did_not_serve() -> None:
    """The same 100 visits due one every 0.1 s; the server answers them in order, 1 a
    second. Recorded as they are answered plus the rest at the stop, the p99 from
    intended start covers the worst; without the rest it would be as good as the served."""
    record = LoadRecord("p")
    stop = 10.0
    for k in range(100):
        visit = Visit(k / 10, ("send",))
        answered = float(k + 1)
        if answered <= stop:
            record.record("send", 1e6, T0 + answered - 1, T0 + answered,
                          intended_us=(answered - visit.intended) * 1e6)  # fmt: skip
            visit.answered("send", 1.0)
        for name, seconds in visit.unanswered(stop):
            record.record_unanswered(name, seconds * 1e6, T0 + visit.intended, T0 + stop)
    merged = merge_chunks([record.chunk()])
    intended = Summary.of(decode(merged["histograms"]["send_intended"]))
    assert intended.count == 100
    assert intended.p99_us >= 9_000_000  # the load lasted 10 s; the first unserved ~9.9 s


@pytest.mark.parametrize(
    ("header", "micros"),
    [
        ("app;dur=0.123", 123.0),
        ("db;dur=53, app;dur=47.2", 47_200.0),
        ('cache;desc="Cache Read";dur=23.2, total;dur=120', 120_000.0),
        ("db;dur=53, render;dur=70", 70_000.0),  # no whole-request metric: the longest
        ("miss, cpu;desc=x", None),
        ("", None),
        (None, None),
        ("app;dur=nan", None),
    ],
)
def test_server_timing(header: str | None, micros: float | None) -> None:
    assert server_time_us(header) == micros


def test_server_time_is_recorded_beside_the_client_time() -> None:
    record = LoadRecord("p", warmup_s=1.0)
    record.record("form", 900, T0, T0 + 0.0009, server_us=120)  # in the warm-up
    record.record("form", 800, T0 + 2, T0 + 2.0008, server_us=100)
    record.record("form", 700, T0 + 3, T0 + 3.0007, failed=True, server_us=90)
    merged = merge_chunks([record.chunk()])
    server = Summary.of(decode(merged["histograms"]["form_server"]))
    assert (server.count, server.max_us) == (1, 100)
