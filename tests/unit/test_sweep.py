import json
from pathlib import Path

from harness.run.sweep import SweepSettings, sweep_mode
from servers.metrics import Recorder


def write_step(
    folder: Path, p99_ms: float, scheduled: int, completed: int, errors: int = 0
) -> None:
    recorder = Recorder()
    for _ in range(99):
        recorder.record("form_intended", 0.001)
        recorder.record("form", 0.001)
    recorder.record("form_intended", p99_ms / 1000)
    recorder.record("form_intended", p99_ms / 1000)
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "histograms": recorder.encoded(),
        "errors": {"form": errors} if errors else {},
        "counters": {"scheduled_starts": scheduled, "completed_starts": completed},
    }
    (folder / "locust-hdr.json").write_text(json.dumps(data))


def run_sweep(tmp_path: Path, steps: list[tuple[float, int, int, int]]) -> list[dict[str, object]]:
    settings = SweepSettings(rates=(10.0, 20.0, 40.0, 80.0, 160.0), step_s=1.0)
    calls: list[float] = []

    def run_step(rate: float, seconds: float, folder: Path) -> None:
        p99, scheduled, completed, errors = steps[len(calls)]
        calls.append(rate)
        write_step(folder, p99, scheduled, completed, errors)

    return sweep_mode("sqlite", settings, tmp_path, run_step)


def test_stops_at_the_step_whose_p99_is_ten_times_the_first(tmp_path: Path) -> None:
    rows = run_sweep(
        tmp_path, [(2, 100, 100, 0), (3, 100, 100, 0), (25, 100, 100, 0), (2, 1, 1, 0)]
    )
    assert [r.knee for r in rows] == [False, False, True]
    assert rows[2].offered_per_s == 40.0
    assert rows[0].form_p99_us < rows[2].form_p99_us


def test_knee_when_visits_are_not_served(tmp_path: Path) -> None:
    rows = run_sweep(tmp_path, [(2, 100, 100, 0), (2, 100, 60, 0), (2, 1, 1, 0)])
    assert len(rows) == 2 and rows[1].knee is True
    assert rows[1].throughput_per_s == 12.0  # 60% of the 20/s offered


def test_knee_on_errors(tmp_path: Path) -> None:
    rows = run_sweep(tmp_path, [(2, 100, 100, 5)])
    assert rows[0].knee is True and rows[0].errors_pct > 1


def test_no_knee_runs_every_step(tmp_path: Path) -> None:
    rows = run_sweep(tmp_path, [(2, 100, 100, 0)] * 5)
    assert len(rows) == 5 and not any(r.knee for r in rows)
