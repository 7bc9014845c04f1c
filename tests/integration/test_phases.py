"""Phases stay apart: the warm-up's and a sweep step's API calls and deliveries never enter
the main phase's figures (a queued mode, run by the driver with a short sweep)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.process import Children
from harness.results.collect import read_locust
from harness.run.config import RunConfig
from harness.run.driver import Driver
from harness.run.sweep import SweepSettings
from servers.metrics import decode
from servers.modes import mode as mode_named

pytestmark = pytest.mark.integration


def api_calls(path: Path) -> int:
    blob = json.loads(path.read_text())["histograms"].get("api")
    return 0 if blob is None else int(decode(blob).get_total_count())


def test_the_main_phase_counts_its_own_sends_and_calls_only(tmp_path: Path) -> None:
    config = RunConfig(
        modes=("sqlite",), scenario="sender", users=10, spawn_rate=10, duration_s=6,
        warmup_s=2, latency="fixed:0.05", sweep=True, worker_concurrency=50,
        drain_timeout_s=30, out=tmp_path, run_id="phases",
    )  # fmt: skip
    queue_dir = tmp_path / "queue"
    queue_dir.mkdir()
    queue_file = mode_named("sqlite").queue_file
    assert queue_file is not None
    with Children() as children:
        driver = Driver(
            config,
            children,
            lambda _: queue_file.format(dir=queue_dir),
            sweep=SweepSettings(rates=(5.0, 10.0), step_s=2.0),
        )
        [result] = driver.run()

    raw = config.run_dir / "raw" / "sqlite"
    ledger = json.loads((raw / "ledger.json").read_text())
    assert result.accounting.sound and result.accounting.delivered == len(ledger)
    main = read_locust(raw)
    boundary = main["first_request_at"] + main["warmup_s"]
    main_sends = [r for r, at in main["sends_ok"] if at >= boundary]
    assert 0 < len(main_sends) < len(main["sends_ok"])  # some were sent in the warm-up
    # The main phase's delivery lag is of its own sends after the warm-up: as many as
    # its `send` row counts, none of the sweep's.
    assert result.histograms["delivery"].get_total_count() == len(main_sends)
    assert result.histograms["send"].get_total_count() == len(main_sends)

    recipients = {e["recipients"][0].casefold(): e for e in ledger}
    steps = sorted((raw / "sweep").glob("step-*"))
    assert len(steps) == 2
    step_calls = 0
    for step in steps:
        sends = read_locust(step)["sends_ok"]
        assert sends, step
        # A step's calls are its own sends' (it is drained before the next begins).
        assert api_calls(step / "worker-0.json") == sum(
            1 for r, _ in sends if r.casefold() in recipients
        )
        assert (step / "server-0.json").is_file()
        step_calls += api_calls(step / "worker-0.json")
    main_calls = api_calls(raw / "worker-0.json")
    warmup_calls = api_calls(raw / "warmup" / "worker-0.json")
    assert warmup_calls > 0
    # Every call is in exactly one phase ...
    assert warmup_calls + main_calls + step_calls == len(ledger)
    # ... and the main phase's are its sends after the warm-up, give or take a job sent
    # just before it whose call began just after it.
    assert len(main_sends) <= main_calls <= len(main_sends) + 5
