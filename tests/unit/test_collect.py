import json
from pathlib import Path

from harness.results.collect import (
    client_sends,
    collect_mode,
    dead_lettered_recipients,
    generator_health,
    open_model_notes,
    timeseries_rows,
)
from harness.results.rows import TimeseriesRow
from servers.metrics import Recorder


def locust_data(seconds: dict[int, dict[str, float]]) -> dict[str, object]:
    per_second = {}
    total = Recorder()
    for second, values in seconds.items():
        r = Recorder()
        for name, value in values.items():
            r.record(name, value)
            total.record(name, value)
        per_second[str(second)] = r.encoded()
    return {"histograms": total.encoded(), "seconds": per_second}


def test_timeseries_has_a_row_per_second_and_metric_and_queue_depth() -> None:
    data = locust_data({100: {"form": 0.001}, 101: {"form": 0.002, "send": 0.003}})
    rows = timeseries_rows("redis", data, {"100": 4, "101": None})
    assert [(r.second, r.metric) for r in rows] == [
        (0, "form"),
        (0, "queue"),
        (1, "form"),
        (1, "send"),
    ]
    assert rows[1] == TimeseriesRow("redis", 0, "queue", queue_depth=4)  # the rest blank
    assert rows[2].p50_us is not None and abs(rows[2].p50_us - 2000) <= 2
    assert rows[2].requests == 1 and rows[2].errors == 0 and rows[2].queue_depth is None


def test_open_model_notes_say_when_the_backlog_grows() -> None:
    # Service time flat at 0.75 s, latency from intended start growing by a second a second.
    seconds = {s: {"send": 0.75, "send_intended": 0.75 + s} for s in range(12)}
    data = locust_data(seconds)
    data["counters"] = {"scheduled_starts": 120, "completed_starts": 60, "late_starts": 50}
    recorder = Recorder()
    recorder.add_encoded(data["histograms"])  # type: ignore[arg-type]
    rows = timeseries_rows("blocking", data, {})
    notes = open_model_notes(data, recorder.histograms, rows)
    assert "120 visits scheduled; 50 started late" in notes[0]
    assert "60 unfinished" in notes[0]
    assert "cannot keep up" in notes[1]


def test_open_model_notes_stay_quiet_when_it_keeps_up() -> None:
    data = locust_data({s: {"send": 0.75, "send_intended": 0.76} for s in range(12)})
    data["counters"] = {"scheduled_starts": 120, "completed_starts": 120}
    recorder = Recorder()
    recorder.add_encoded(data["histograms"])  # type: ignore[arg-type]
    notes = open_model_notes(data, recorder.histograms, timeseries_rows("direct", data, {}))
    assert not any("cannot keep up" in n for n in notes)


def test_generator_bound_when_cpu_saturates() -> None:
    assert generator_health({"cpu_samples": [95, 97, 99, 50]})["bound"] is True
    assert generator_health({"cpu_samples": [20, 30, 25, 95]})["bound"] is False
    assert generator_health({"cpu_warnings": 1, "cpu_samples": [10]})["bound"] is True


def test_generator_bound_on_cpu_warnings_without_cpu_samples() -> None:
    # Locust warned about its CPU, but this process took no samples (a short run, or
    # samples kept by Locust workers): the warning alone marks the run generator-bound.
    assert generator_health({"cpu_warnings": 2})["bound"] is True
    assert generator_health({"cpu_warnings": 2, "cpu_samples": []})["bound"] is True
    assert generator_health({})["bound"] is False


def test_client_sends_cover_the_main_phase_the_sweep_and_sends_cut_short(tmp_path: Path) -> None:
    (tmp_path / "sweep" / "step-1").mkdir(parents=True)
    main = {"sends_ok": [["a@x.test", 1.5]], "sends_failed": ["b@x.test"],
            "sends_started": ["a@x.test", "b@x.test", "c@x.test"]}  # fmt: skip
    step = {"sends_ok": [["d@x.test", 2.0]], "sends_started": ["d@x.test"]}
    (tmp_path / "locust-hdr.json").write_text(json.dumps(main))
    (tmp_path / "sweep" / "step-1" / "locust-hdr.json").write_text(json.dumps(step))
    accepted, attempted = client_sends(tmp_path)
    assert sorted(accepted) == [("a@x.test", 1.5), ("d@x.test", 2.0)]
    # c never got an answer (the run ended first), yet it was attempted.
    assert {"b@x.test", "c@x.test"} <= set(attempted)


def test_dead_letter_journals_survive_a_line_cut_by_a_kill(tmp_path: Path) -> None:
    (tmp_path / "dead-letters-0.jsonl").write_text(
        json.dumps({"id": "1", "to": "a@x.test", "reason": "400"}) + "\n"
    )
    (tmp_path / "dead-letters-1.jsonl").write_text(
        json.dumps({"id": "2", "to": "b@x.test", "reason": "gave up"}) + '\n{"id": "3", "to'
    )
    assert dead_lettered_recipients(tmp_path) == ["a@x.test", "b@x.test"]


def test_values_clamped_at_the_histogram_ceiling_get_a_note(tmp_path: Path) -> None:
    (tmp_path / "locust-hdr.json").write_text(json.dumps(locust_data({100: {"form": 0.001}})))
    worker = Recorder()
    worker.record("queue_wait", 0.5)
    worker.record("queue_wait", 2 * 3600)  # two hours: above the ceiling
    (tmp_path / "worker-0.json").write_text(json.dumps({"histograms": worker.encoded()}))
    result = collect_mode("redis", tmp_path, 20.0, [], [])
    assert result.histograms["queue_wait"].get_total_count() == 2
    assert [n for n in result.notes if "ceiling" in n] == [
        "queue_wait: 1 value of an hour or more, recorded as 1 h (the histograms' ceiling)"
    ]


def test_no_ceiling_note_when_nothing_was_clamped(tmp_path: Path) -> None:
    (tmp_path / "locust-hdr.json").write_text(json.dumps(locust_data({100: {"form": 0.001}})))
    result = collect_mode("direct", tmp_path, 20.0, [], [])
    assert not [n for n in result.notes if "ceiling" in n]


def write_phase(folder: Path, sends: list[tuple[str, float]], **extra: object) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    send = Recorder()
    for _ in sends:
        send.record("send", 0.002)
    data = {"histograms": send.encoded(), "sends_ok": [list(s) for s in sends], **extra}
    (folder / "locust-hdr.json").write_text(json.dumps(data))


def delivered(*sends: tuple[str, float]) -> list[dict[str, object]]:
    return [{"recipients": [r], "accepted_at": at + 0.8} for r, at in sends]


def test_the_main_phase_delivery_is_of_its_own_sends_after_the_warmup(tmp_path: Path) -> None:
    warm, main, later = ("w@x.test", 101.0), ("m1@x.test", 104.0), ("m2@x.test", 110.0)
    step = ("s@x.test", 140.0)
    write_phase(tmp_path, [warm, main, later], first_request_at=100.0, warmup_s=3.0)
    write_phase(tmp_path / "sweep" / "step-00", [step], first_request_at=139.0)
    ledger = delivered(warm, main, later, step)
    result = collect_mode("sqlite", tmp_path, 20.0, ledger, [])
    # Every send is accounted for, in every phase ...
    assert (result.accounting.accepted, result.accounting.delivered) == (4, 4)
    # ... but the main phase's delivery lag is of the sends its `send` row counts.
    assert result.histograms["delivery"].get_total_count() == 2


def test_rates_are_per_second_of_the_load_after_its_warmup(tmp_path: Path) -> None:
    sends = [(f"r{n}@x.test", 104.0 + n / 10) for n in range(170)]
    write_phase(tmp_path, sends, first_request_at=100.0, warmup_s=3.0)
    worker = Recorder()
    for _ in range(170):
        worker.record("api", 0.75)
    (tmp_path / "worker-0.json").write_text(json.dumps({"histograms": worker.encoded()}))
    # Locust ran 22.4 s, its start-up and stop included, for a load of 20 s.
    result = collect_mode("sqlite", tmp_path, 22.4, delivered(*sends), [], load_s=20.0)
    rates = {row.metric: row.rate_per_s for row in result.summary_rows()}
    assert rates == {"send": 10.0, "api": 10.0, "delivery": 10.0}
