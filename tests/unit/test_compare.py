"""The CI gate's decision rule, on synthetic results folders written by the real writer.

Each synthetic run draws per-request latencies (lognormal around a median, scaled per
second by a "machine load" factor) so that the per-second p50s in timeseries.csv, the
summary and the HdrHistograms all agree as they do in a real run. On top of that, runs
differ from each other (:func:`pool`): a machine factor per round, shared by a round's
two sides and by the form page and POST /send, and each run's own factors — the
between-run variance the gate's test must hold its false-alarm rate under. Seeds are
fixed: every test is deterministic.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from harness.cli import main as mailbench
from harness.errors import ConfigError, ResultsError
from harness.gate import compare
from harness.gate.compare import GAP, GateSettings, compare_runs, load_runs
from harness.results.accounting import Accounting
from harness.results.folder import Layout, ModeResult, Run, load_run, write_manifest, write_results
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


def rounds(
    folder: Path,
    base: list[Mode],
    cur: list[Mode],
    k: int,
    seed: int = 1,
    round_sigma: float = 0.10,
    run_sigma: float = 0.02,
    gap_sigma: float = 0.01,
) -> tuple[list[Run], list[Run]]:
    """``k`` rounds of a baseline and a current run measured side by side. A round's
    machine factor (``round_sigma``) slows both sides' form pages and sends alike; each
    run adds its own (``run_sigma``), and its send path its own again (``gap_sigma``)."""
    rng = np.random.default_rng(seed)
    sides: tuple[list[Path], list[Path]] = ([], [])
    for n in range(k):
        machine = float(rng.lognormal(0.0, round_sigma))
        for side, modes in enumerate((base, cur)):
            own = machine * float(rng.lognormal(0.0, run_sigma))
            path = "bc"[side] + str(n)
            drawn = [
                replace(
                    m,
                    form_us=m.form_us * own,
                    send_us=m.send_us * own * float(rng.lognormal(0.0, gap_sigma)),
                )
                for m in modes
            ]
            sides[side].append(write_run(folder / path, *drawn, seed=seed * 1000 + 2 * n + side))
    return load_runs(sides[0]), load_runs(sides[1])


PAIRED = GateSettings(paired=True, schedule="concurrent")
# As busy as a bench-ci run: 1,200 requests a run, so a run's p50 is known to about 1%.
BUSY = Mode(form_per_s=60, send_per_s=60)
SLOWER_SEND = replace(BUSY, send_us=4000 * 1.10)  # +10% on the gap, the form page unchanged


# -- the test across runs, on numbers ----------------------------------------------------


def simulated_gate(rng: np.random.Generator, k: int, effect: float) -> bool:
    """One gate decision over 2 modes × the 3 figures bench-ci tests (gap, send p99,
    form p50) with between-run variance: a round's machine (20%) shared by its two sides,
    each run's own 2% (a pair's log ratio then spreads by 2.8%, as measured side by side
    on a 2-core machine, docs/gate.md); ``effect`` is a true change of the first mode's
    first figure. True: the gate fails."""
    judged = []
    for mode in range(2):
        machine = rng.lognormal(0.0, 0.20, size=k)
        for figure in range(3):
            base = machine * rng.lognormal(0.0, 0.02, size=k)
            cur = machine * rng.lognormal(0.0, 0.02, size=k)
            if mode == 0 and figure == 0:
                cur = cur * (1 + effect)
            across = compare.across_runs(list(base), list(cur), PAIRED)
            row = compare.Row(str(mode), str(figure), "µs", "min-change", None, None)
            row = replace(row, change=across.change, p_value=across.p_greater)
            judged.append(compare.Judged(row, across))
    return any(row.verdict == "regression" for row in compare.decide(judged, PAIRED))


def test_the_false_alarm_rate_per_gate_is_below_alpha_under_between_run_variance() -> None:
    """400 gates of unchanged code, 6 figures over 6 rounds each: Holm keeps the chance
    that any of the 6 fails below alpha (1%) per gate, not per figure."""
    rng = np.random.default_rng(7)
    false_alarms = sum(simulated_gate(rng, 6, 0.0) for _ in range(400))
    assert false_alarms <= 0.01 * 400, false_alarms


def test_a_ten_percent_change_is_caught_over_six_rounds() -> None:
    """Of one figure alone (a change of one backend), at the noise measured."""
    rng = np.random.default_rng(8)
    caught = sum(simulated_gate(rng, 6, 0.10) for _ in range(200))
    assert caught >= 0.90 * 200, caught


def test_holm_adjusts_step_down() -> None:
    adjusted = compare.holm([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert compare.holm([]) == [] and compare.holm([0.5, 0.9]) == [1.0, 1.0]


# -- the decision rule on results folders ------------------------------------------------


def test_unchanged_code_passes_though_its_runs_differ(tmp_path: Path) -> None:
    base, cur = rounds(tmp_path, [BUSY], [BUSY], k=6, round_sigma=0.25, run_sigma=0.05)
    result = compare_runs(base, cur, PAIRED)
    assert result.exit_code == 0, result.markdown()
    gap = rows_of(result, GAP)
    assert gap.verdict == "ok" and gap.n_baseline == gap.n_current == 6
    assert gap.p_value is not None and gap.p_holm is not None and gap.p_holm >= gap.p_value


def test_seconds_of_one_run_are_not_independent_draws(tmp_path: Path) -> None:
    """A pool of 16 runs of the same code, each run 10% off the others in its machine and
    8% in its send path (a sequential CI job's spread): 100 gate decisions, 3 runs against
    3 others. Testing seconds, a decision sees ~60 seconds a side and calls a run-to-run
    difference significant; testing runs, the false alarms stay near alpha."""
    rng = np.random.default_rng(3)
    paths = []
    for n in range(16):
        machine, send = rng.lognormal(0.0, 0.10), rng.lognormal(0.0, 0.08)
        mode = Mode(seconds=21, form_us=1500 * machine, send_us=4000 * machine * send)
        paths.append(write_run(tmp_path / f"r{n}", mode, seed=100 + n))
    runs = load_runs(paths)
    failed = 0
    for _ in range(100):
        chosen = rng.choice(16, size=6, replace=False)
        base, cur = [runs[i] for i in chosen[:3]], [runs[i] for i in chosen[3:]]
        failed += compare_runs(base, cur).exit_code
    assert failed <= 2, f"{failed} of 100 decisions on unchanged code failed"


def test_a_ten_percent_slower_send_path_is_caught_over_paired_rounds(tmp_path: Path) -> None:
    base, cur = rounds(tmp_path, [BUSY], [SLOWER_SEND], k=6, round_sigma=0.25)
    result = compare_runs(base, cur, PAIRED)
    gap = rows_of(result, GAP)
    assert gap.verdict == "regression", result.markdown()
    assert gap.change is not None and 0.05 < gap.change < 0.15
    assert result.exit_code == 1


def test_pairing_cancels_each_rounds_machine(tmp_path: Path) -> None:
    """The same rounds unpaired: the rounds' 25% machine swings drown the 10%."""
    base, cur = rounds(tmp_path, [BUSY], [SLOWER_SEND], k=6, round_sigma=0.25, gap_sigma=0.02)
    paired = rows_of(compare_runs(base, cur, PAIRED), "form p50")
    unpaired = rows_of(compare_runs(base, cur, replace(PAIRED, paired=False)), "form p50")
    assert paired.p_value is not None and unpaired.p_value is not None
    assert paired.p_value < unpaired.p_value
    result = compare_runs(base, cur, replace(PAIRED, paired=False))
    assert rows_of(result, GAP).verdict == "regression"  # the gap holds still either way
    assert rows_of(result, "send p50").verdict == "info"  # the gap times the form page


def test_a_significant_change_below_the_min_change_passes(tmp_path: Path) -> None:
    quiet = [replace(BUSY, sigma=0.1, load_sigma=0.02)]
    slower = [replace(quiet[0], send_us=4000 * 1.03)]
    base, cur = rounds(tmp_path, quiet, slower, k=6, run_sigma=0.003, gap_sigma=0.003)
    result = compare_runs(base, cur, PAIRED)
    gap = rows_of(result, GAP)
    assert gap.p_holm is not None and gap.p_holm < 0.01
    assert gap.change is not None and 0 < gap.change < 0.05
    assert gap.verdict == "ok" and result.exit_code == 0


def test_big_noise_alone_is_not_flagged(tmp_path: Path) -> None:
    noisy = [Mode(sigma=0.8, load_sigma=0.6)]  # few requests, much noise
    for seed in range(2, 6):
        base, cur = rounds(tmp_path / str(seed), noisy, noisy, k=6, seed=seed, run_sigma=0.2)
        result = compare_runs(base, cur, PAIRED)
        assert result.exit_code == 0, result.markdown()


def test_a_busier_machine_is_excused_only_in_sequential_runs(tmp_path: Path) -> None:
    """The current runs twice as slow in everything. One after the other, that is a
    busier machine: the gap holds, send p99 is +100% but the form page slowed as much.
    Side by side, both sides saw the same machine: the form page itself fails."""
    base, cur = rounds(tmp_path, [BUSY], [replace(BUSY, form_us=3000, send_us=8000)], k=4)
    sequential = compare_runs(base, cur, GateSettings(paired=True))
    send = rows_of(sequential, "send p99")
    assert send.change is not None and send.change > 0.5
    assert send.verdict == "ok" and "busier machine" in send.note
    assert rows_of(sequential, GAP).verdict == "ok"
    assert rows_of(sequential, "form p50").rule == "info"
    assert sequential.exit_code == 0, sequential.markdown()

    concurrent = compare_runs(base, cur, PAIRED)
    assert rows_of(concurrent, "form p50").verdict == "regression", concurrent.markdown()
    assert rows_of(concurrent, "send p99").verdict == "regression"
    assert "a busier machine" not in concurrent.markdown()


def test_api_bound_modes_judge_send_itself_not_the_gap(tmp_path: Path) -> None:
    """direct: send ≈ the API's 750 ms. A form page twice as fast doubles the gap, which
    must not fail; a 2 ms slower send (+0.3%) must not either; +15% must."""
    direct = replace(BUSY, name="direct", send_us=750_000, sigma=0.15)
    faster_form = replace(direct, form_us=750, send_us=752_000)
    base, cur = rounds(tmp_path / "a", [direct], [faster_form], k=4)
    result = compare_runs(base, cur, GateSettings(paired=True))
    assert rows_of(result, GAP, "direct").verdict == "info"
    assert rows_of(result, "send p50", "direct").verdict == "ok"
    assert result.exit_code == 0, result.markdown()

    slower = replace(direct, send_us=750_000 * 1.15)
    base, cur = rounds(tmp_path / "b", [direct], [slower], k=4)
    result = compare_runs(base, cur, GateSettings(paired=True))
    assert rows_of(result, "send p50", "direct").verdict == "regression", result.markdown()


def test_a_faster_send_path_is_reported_not_failed(tmp_path: Path) -> None:
    base, cur = rounds(tmp_path, [BUSY], [replace(BUSY, send_us=2500)], k=4)
    result = compare_runs(base, cur, PAIRED)
    assert rows_of(result, GAP).verdict == "faster"
    assert result.exit_code == 0


def test_one_run_a_side_counts_only_changes_beyond_the_band(tmp_path: Path) -> None:
    """No spread between runs to test against: unchanged code and +20% pass, noted as
    untested; +75% (a 2 ms slower queued send) fails."""
    assert gate(tmp_path / "a", [Mode()], [Mode()]).exit_code == 0
    result = gate(tmp_path / "b", [Mode()], [Mode(send_us=4800)])
    gap = rows_of(result, GAP)
    assert gap.verdict == "ok" and gap.p_value is None and "no test" in gap.note
    result = gate(tmp_path / "c", [Mode()], [Mode(send_us=7000)])
    assert rows_of(result, GAP).verdict == "regression", result.markdown()
    assert result.exit_code == 1


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


def test_runs_without_sends_have_no_figure(tmp_path: Path) -> None:
    result = gate(tmp_path, [Mode(send_per_s=0)], [Mode(send_per_s=0)])
    gap = rows_of(result, GAP)
    assert gap.n_baseline == gap.n_current == 0
    assert gap.baseline is None and gap.verdict == "info"
    assert result.exit_code == 0


def test_a_mode_missing_on_the_current_side_fails(tmp_path: Path) -> None:
    result = gate(tmp_path, [Mode(), Mode("redis")], [Mode()])
    missing = rows_of(result, "mode", "redis")
    assert missing.verdict == "missing" and "current" in missing.note
    assert result.exit_code == 1 and "**MISSING**" in result.markdown()


def test_a_mode_missing_from_one_current_run_fails(tmp_path: Path) -> None:
    base, cur = rounds(tmp_path, [Mode(), Mode("redis")], [Mode(), Mode("redis")], k=3)
    cur[1] = load_run(write_run(tmp_path / "short", Mode(), seed=5))
    result = compare_runs(base, cur, PAIRED)
    assert rows_of(result, "mode", "redis").verdict == "missing"
    assert result.exit_code == 1


def test_a_mode_new_on_the_current_side_is_shown(tmp_path: Path) -> None:
    result = gate(tmp_path, [Mode()], [Mode(), Mode("redis")])
    assert rows_of(result, "mode", "redis").verdict == "new"
    assert result.exit_code == 0


def test_accounting_missing_on_the_current_side_fails(tmp_path: Path) -> None:
    baseline = load_run(write_run(tmp_path / "base", Mode(), seed=1))
    current = load_run(write_run(tmp_path / "cur", Mode(), seed=2))
    current.accounting = []
    result = compare_runs([baseline], [current])
    lost = rows_of(result, "lost")
    assert lost.verdict == "missing" and "no accounting" in lost.note
    assert result.exit_code == 1


def test_folders_without_histograms_are_refused(tmp_path: Path) -> None:
    """Percentiles of runs cannot be averaged into the percentile of them all."""
    baseline = write_run(tmp_path / "base", Mode(), seed=1)
    current = write_run(tmp_path / "cur", Mode(), seed=2)
    shutil.rmtree(Layout(current).hdr)
    with pytest.raises(ResultsError, match="no histogram of sqlite"):
        compare_runs(load_runs([baseline]), load_runs([current]))


def test_paired_sides_need_as_many_runs(tmp_path: Path) -> None:
    base, cur = rounds(tmp_path, [Mode()], [Mode()], k=3)
    with pytest.raises(ConfigError, match="as many baseline runs"):
        compare_runs(base, cur[:2], PAIRED)


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
        "min_change": 0.05,
        "alpha": 0.01,
        "abs_band": 0.5,
        "min_runs": 3,
        "paired": False,
        "schedule": "sequential",
    }
    assert data["baseline"] == [str(base)] and data["current"] == [str(lost)]
    row = next(r for r in data["rows"] if r["mode"] == "sqlite" and r["metric"] == "lost")
    assert row["current"] == 3 and row["verdict"] == "regression"
    assert set(data["rows"][0]) == {
        "mode", "metric", "unit", "rule", "baseline", "current", "change", "p_value",
        "p_holm", "n_baseline", "n_current", "spread", "verdict", "note",
    }  # fmt: skip


def test_cli_takes_several_folders_per_side_and_pairs_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, cur = rounds(tmp_path, [BUSY], [SLOWER_SEND], k=6, round_sigma=0.25)
    b, c = ",".join(str(r.path) for r in base), ",".join(str(r.path) for r in cur)
    code = mailbench(
        ["compare", "--baseline", b, "--current", c, "--paired", "--schedule", "concurrent"]
    )
    out = capsys.readouterr().out
    assert code == 1, out
    assert "6/6 runs" in out and "paired by round" in out and "(concurrent)" in out
    assert (
        mailbench(["compare", "--baseline", b, "--current", c.rsplit(",", 1)[0], "--paired"]) == 2
    )


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


def test_settings_out_of_range() -> None:
    for wrong in ({"alpha": 1.5}, {"min_runs": 1}, {"schedule": "parallel"}):
        with pytest.raises(ConfigError):
            GateSettings(**wrong)  # type: ignore[arg-type]


def test_benchmark_json_is_custom_smaller_is_better(tmp_path: Path) -> None:
    from harness.gate.bench_ci import benchmark_entries, write_outputs

    base, cur = rounds(tmp_path, [Mode()], [Mode(send_us=7000)], k=3)
    result = compare_runs(base, cur, PAIRED)
    write_outputs(result, tmp_path / "ci")
    entries = json.loads((tmp_path / "ci" / "benchmark.json").read_text())
    assert entries == benchmark_entries(result)
    assert all(set(e) == {"name", "unit", "value", "range", "extra"} for e in entries)
    gap = next(e for e in entries if e["name"] == "sqlite gap (send/form p50)")
    assert gap["unit"] == "x" and isinstance(gap["value"], float) and gap["range"].startswith("± ")
    assert "verdict: regression" in gap["extra"] and "change: +" in gap["extra"]
    assert next(e for e in entries if e["name"] == "sqlite lost")["value"] == 0
    assert (tmp_path / "ci" / "compare.md").read_text() == result.markdown()


def test_a_change_not_significant_over_few_rounds_says_so(tmp_path: Path) -> None:
    """+30% of the send path, but three rounds whose gaps swing by 25%: not enough."""
    slower = [replace(BUSY, send_us=4000 * 1.3)]
    base, cur = rounds(tmp_path, [BUSY], slower, k=3, gap_sigma=0.25)
    gap = rows_of(compare_runs(base, cur, PAIRED), GAP)
    assert gap.change is not None and gap.change > 0.05
    assert gap.verdict == "ok" and gap.note == "not significant over 3 runs a side"
