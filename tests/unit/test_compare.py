"""The CI gate's decision rule, on synthetic results folders written by the real writer.

Each synthetic run draws per-request latencies (lognormal around a median, scaled per
second by a "machine load" factor) so that the per-second p50s in timeseries.csv, the
summary and the HdrHistograms all agree as they do in a real run. Seeds are fixed: every
test is deterministic.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from harness.cli import main as mailbench
from harness.errors import ConfigError, ResultsError
from harness.gate import compare
from harness.gate.compare import GateSettings, compare_runs, load_runs
from harness.results.accounting import Accounting
from harness.results.folder import ModeResult, write_manifest, write_results
from harness.results.rows import TimeseriesRow
from servers.metrics import new_histogram, record_us


@dataclass(frozen=True)
class Mode:
    """How one synthetic mode behaves."""

    name: str = "sqlite"
    form_us: float = 1500.0  # per-request median
    send_us: float = 4000.0
    seconds: int = 20
    form_per_s: int = 20
    send_per_s: int = 15
    sigma: float = 0.3  # per-request spread (lognormal)
    load_sigma: float = 0.1  # second-to-second machine swings, shared by form and send
    lost: int = 0
    unexpected: int = 0
    duplicates: int = 0
    send_errors: int = 0


def write_run(
    folder: Path, *modes: Mode, seed: int = 1, config: dict[str, object] | None = None
) -> Path:
    rng = np.random.default_rng(seed)
    results = []
    for mode in modes:
        histograms = {"form": new_histogram(), "send": new_histogram()}
        timeseries = []
        for second in range(mode.seconds):
            load = float(rng.lognormal(0.0, mode.load_sigma))
            for metric, median, count in (
                ("form", mode.form_us, mode.form_per_s),
                ("send", mode.send_us, mode.send_per_s),
            ):
                values = median * load * rng.lognormal(0.0, mode.sigma, size=count)
                for value in values:
                    record_us(histograms[metric], value)
                timeseries.append(
                    TimeseriesRow(
                        mode.name,
                        second,
                        metric,
                        requests=count,
                        errors=0,
                        p50_us=round(float(np.median(values))) if count else None,
                        p99_us=round(float(np.percentile(values, 99))) if count else None,
                    )
                )
        accepted = mode.send_per_s * mode.seconds
        accounting = Accounting(
            accepted, accepted - mode.lost, mode.duplicates, 0, mode.lost, mode.unexpected
        )
        results.append(
            ModeResult(
                mode=mode.name,
                duration_s=float(mode.seconds),
                histograms=histograms,
                errors={"send": mode.send_errors},
                accounting=accounting,
                timeseries=timeseries,
            )
        )
    write_manifest(folder, {"run_id": folder.name, "config": config or {"users": 20}})
    write_results(folder, results)
    return folder


def rows_of(comparison: compare.Comparison, metric: str, mode: str = "sqlite") -> compare.Row:
    return next(r for r in comparison.rows if r.mode == mode and r.metric == metric)


def gate(tmp_path: Path, base: list[Mode], cur: list[Mode]) -> compare.Comparison:
    baseline = write_run(tmp_path / "base", *base, seed=1)
    current = write_run(tmp_path / "cur", *cur, seed=2)
    return compare_runs(load_runs([baseline]), load_runs([current]))


# -- the decision rule -----------------------------------------------------------------


def test_identical_noise_passes(tmp_path: Path) -> None:
    result = gate(tmp_path, [Mode()], [Mode()])
    assert result.exit_code == 0, result.markdown()
    gap = rows_of(result, "gap (send/form p50)")
    assert gap.verdict == "ok" and gap.n_baseline == gap.n_current == 19  # warm-up second out
    assert gap.p_value is not None and gap.p_value > 0.01


def test_a_shift_just_above_the_min_change_is_flagged(tmp_path: Path) -> None:
    """A 12% slower send path (the form page unchanged), 29 quiet seconds a side: flagged."""
    quiet = Mode(seconds=30, sigma=0.15, load_sigma=0.05)
    result = gate(tmp_path, [quiet], [replace(quiet, send_us=4000 * 1.12)])
    gap = rows_of(result, "gap (send/form p50)")
    assert gap.verdict == "regression", result.markdown()
    assert gap.change is not None and gap.change >= 0.10
    assert gap.p_value is not None and gap.p_value < 0.01
    assert result.exit_code == 1


def test_a_significant_shift_below_the_min_change_passes(tmp_path: Path) -> None:
    """Both conditions are needed: a 5% shift over 60 quiet seconds is significant but small."""
    quiet = Mode(seconds=60, sigma=0.1, load_sigma=0.02, send_per_s=30)
    result = gate(tmp_path, [quiet], [replace(quiet, send_us=4000 * 1.05)])
    gap = rows_of(result, "gap (send/form p50)")
    assert gap.p_value is not None and gap.p_value < 0.01
    assert gap.change is not None and 0 < gap.change < 0.10
    assert gap.verdict == "ok" and result.exit_code == 0


def test_a_big_shift_over_three_seconds_is_not_enough_data(tmp_path: Path) -> None:
    result = gate(tmp_path, [Mode(seconds=4)], [Mode(seconds=4, send_us=4000 * 1.3)])
    gap = rows_of(result, "gap (send/form p50)")
    assert gap.n_baseline == gap.n_current == 3
    assert gap.verdict == "insufficient data" and "above the threshold" in gap.note
    assert gap.p_value is None
    assert result.exit_code == 0
    assert "insufficient data" in result.markdown()


def test_big_noise_alone_is_not_flagged(tmp_path: Path) -> None:
    noisy = Mode(sigma=0.8, load_sigma=0.6)
    for seed in range(2, 8):  # several draws of the current side, none may fail
        baseline = write_run(tmp_path / "base", noisy, seed=1)
        current = write_run(tmp_path / f"cur{seed}", noisy, seed=seed)
        result = compare_runs(load_runs([baseline]), load_runs([current]))
        assert result.exit_code == 0, result.markdown()


def test_a_busier_machine_moves_absolute_figures_but_is_not_flagged(tmp_path: Path) -> None:
    """Everything twice as slow: the gap holds; send p50 is +100% (beyond the band) and
    significant, but the form page slowed as much: a busier machine, not a regression."""
    result = gate(tmp_path, [Mode()], [Mode(form_us=3000, send_us=8000)])
    send = rows_of(result, "send p50")
    assert send.change is not None and send.change > 0.5
    assert send.p_value is not None and send.p_value < 0.01
    assert send.verdict == "ok" and "busier machine" in send.note
    assert rows_of(result, "gap (send/form p50)").verdict == "ok"
    assert result.exit_code == 0, result.markdown()


def test_absolute_send_beyond_the_band_with_a_steady_form_page_is_flagged(tmp_path: Path) -> None:
    result = gate(tmp_path, [Mode()], [Mode(send_us=7000)])
    assert rows_of(result, "send p50").verdict == "regression"
    assert rows_of(result, "gap (send/form p50)").verdict == "regression"


def test_api_bound_modes_judge_send_itself_not_the_gap(tmp_path: Path) -> None:
    """direct: send ≈ the API's 750 ms. A form page twice as fast doubles the gap, which
    must not fail; a 2 ms slower send (+0.3%) must not either; +15% must."""
    direct = Mode("direct", form_us=1500, send_us=750_000, sigma=0.15)
    faster_form = Mode("direct", form_us=750, send_us=752_000, sigma=0.15)
    result = gate(tmp_path / "a", [direct], [faster_form])
    assert rows_of(result, "gap (send/form p50)", "direct").verdict == "info"
    assert rows_of(result, "send p50", "direct").verdict == "ok"
    assert result.exit_code == 0, result.markdown()

    slower = Mode("direct", form_us=1500, send_us=750_000 * 1.15, sigma=0.15)
    result = gate(tmp_path / "b", [direct], [slower])
    assert rows_of(result, "send p50", "direct").verdict == "regression", result.markdown()


def test_a_faster_send_path_is_reported_not_failed(tmp_path: Path) -> None:
    result = gate(tmp_path, [Mode()], [Mode(send_us=2500)])
    assert rows_of(result, "gap (send/form p50)").verdict == "faster"
    assert result.exit_code == 0


def test_lost_or_unexpected_always_fail(tmp_path: Path) -> None:
    result = gate(tmp_path / "a", [Mode()], [Mode(lost=1)])
    assert rows_of(result, "lost").verdict == "regression"
    assert result.exit_code == 1
    result = gate(tmp_path / "b", [Mode()], [Mode(unexpected=2)])
    assert rows_of(result, "unexpected").verdict == "regression"
    assert rows_of(result, "lost").verdict == "ok"


def test_more_failed_requests_fail(tmp_path: Path) -> None:
    result = gate(tmp_path, [Mode()], [Mode(send_errors=30)])  # 30 of 700 requests
    assert rows_of(result, "failed requests").verdict == "regression"


def test_sparse_sends_skip_seconds_without_sends(tmp_path: Path) -> None:
    result = gate(tmp_path, [Mode(send_per_s=0)], [Mode(send_per_s=0)])
    gap = rows_of(result, "gap (send/form p50)")
    assert gap.n_baseline == gap.n_current == 0
    assert gap.baseline is None and gap.verdict == "info"
    assert result.exit_code == 0


def test_a_mode_on_one_side_only_is_reported(tmp_path: Path) -> None:
    result = gate(tmp_path, [Mode(), Mode("redis")], [Mode()])
    missing = rows_of(result, "mode", "redis")
    assert missing.verdict == "missing" and "current" in missing.note
    assert result.exit_code == 0


def test_several_runs_a_side_pool_their_seconds(tmp_path: Path) -> None:
    bases = [write_run(tmp_path / f"b{i}", Mode(seconds=4), seed=i) for i in range(3)]
    curs = [
        write_run(tmp_path / f"c{i}", Mode(seconds=4, send_us=6000), seed=9 + i) for i in range(2)
    ]
    result = compare_runs(load_runs(bases), load_runs(curs))
    gap = rows_of(result, "gap (send/form p50)")
    assert (gap.n_baseline, gap.n_current) == (9, 6)  # enough together, not alone
    assert gap.verdict == "regression", result.markdown()


def test_config_differences_are_noted(tmp_path: Path) -> None:
    baseline = write_run(tmp_path / "b", Mode(), config={"users": 20, "send_delay_ms": 0.0})
    current = write_run(tmp_path / "c", Mode(), config={"users": 40, "send_delay_ms": 0.0})
    result = compare_runs(load_runs([baseline]), load_runs([current]))
    assert result.notes == ["configs differ: users 20 (baseline) vs 40 (current)"]


# -- command line ------------------------------------------------------------------------


def test_cli_exit_codes_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = write_run(tmp_path / "base", Mode(), Mode("direct", send_us=750_000), seed=1)
    good = write_run(tmp_path / "good", Mode(), Mode("direct", send_us=750_000), seed=2)
    lost = write_run(tmp_path / "lost", Mode(lost=3), Mode("direct", send_us=750_000), seed=3)
    assert mailbench(["compare", str(base), str(good)]) == 0
    table = capsys.readouterr().out
    assert "| metric | baseline | current | change | verdict |" in table
    assert "| sqlite gap (send/form p50) |" in table and "| direct send p50 |" in table

    out = tmp_path / "ci" / "compare.json"
    assert mailbench(["compare", str(base), str(lost), "--json", str(out)]) == 1
    assert "**REGRESSION**" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["result"] == "fail" and data["regressions"] == 1
    assert data["settings"] == {
        "min_change": 0.1,
        "alpha": 0.01,
        "abs_band": 0.5,
        "min_samples": 5,
        "warmup_s": None,  # each run's own
    }
    assert data["baseline"] == [str(base)] and data["current"] == [str(lost)]
    row = next(r for r in data["rows"] if r["mode"] == "sqlite" and r["metric"] == "lost")
    assert row["current"] == 3 and row["verdict"] == "regression"
    assert set(data["rows"][0]) == {
        "mode", "metric", "unit", "rule", "baseline", "current", "change", "p_value",
        "n_baseline", "n_current", "spread", "verdict", "note",
    }  # fmt: skip


def test_cli_takes_several_folders_per_side(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = [write_run(tmp_path / f"r{i}", Mode(seconds=4), seed=i) for i in range(4)]
    code = mailbench(
        ["compare", "--baseline", f"{runs[0]},{runs[1]}", "--baseline", str(runs[2]), str(runs[3])]
    )
    assert code == 0
    assert "n=9/3 s" in capsys.readouterr().out


def test_a_folder_that_is_not_a_results_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_run(tmp_path / "good", Mode())
    (tmp_path / "empty").mkdir()
    assert mailbench(["compare", str(good), str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not a mailbench results folder" in err
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "latest").symlink_to(good)
    with pytest.raises(ResultsError, match="did you mean"):
        load_runs([tmp_path / "root"])


@pytest.mark.parametrize(
    "argv",
    [["a"], ["a", "b", "c"], ["--baseline", "a", "--current", "b", "c"]],
)
def test_wrong_folder_arguments_say_so(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    compare.add_cli_arguments(parser)
    with pytest.raises(ConfigError):
        compare.sides(parser.parse_args(argv))


def test_the_warm_up_each_run_records_is_left_out(tmp_path: Path) -> None:
    recorded = {"users": 20, "warmup_s": 3.0}
    base = load_runs([write_run(tmp_path / "b", Mode(seconds=10), seed=1, config=recorded)])
    older = load_runs([write_run(tmp_path / "o", Mode(seconds=10), seed=2)])  # no warmup_s
    send = rows_of(compare_runs(base, older), "send p50")
    assert (send.n_baseline, send.n_current) == (7, 9)  # 3 s recorded; 1 s before records
    send = rows_of(compare_runs(base, older, GateSettings(warmup_s=0)), "send p50")
    assert (send.n_baseline, send.n_current) == (10, 10)  # --warmup given: for both
    send = rows_of(compare_runs(base, older, GateSettings(warmup_s=2.5)), "send p50")
    assert (send.n_baseline, send.n_current) == (7, 7)  # the second it ends in is out


def test_settings_out_of_range() -> None:
    with pytest.raises(ConfigError):
        GateSettings(alpha=1.5)


def test_benchmark_json_is_custom_smaller_is_better(tmp_path: Path) -> None:
    from harness.gate.bench_ci import benchmark_entries, write_outputs

    result = gate(tmp_path, [Mode()], [Mode(send_us=7000)])
    write_outputs(result, tmp_path / "ci")
    entries = json.loads((tmp_path / "ci" / "benchmark.json").read_text())
    assert entries == benchmark_entries(result)
    assert all(set(e) == {"name", "unit", "value", "range", "extra"} for e in entries)
    gap = next(e for e in entries if e["name"] == "sqlite gap (send/form p50)")
    assert gap["unit"] == "x" and isinstance(gap["value"], float) and gap["range"].startswith("± ")
    assert "verdict: regression" in gap["extra"] and "change: +" in gap["extra"]
    assert next(e for e in entries if e["name"] == "sqlite lost")["value"] == 0
    assert (tmp_path / "ci" / "compare.md").read_text() == result.markdown()
