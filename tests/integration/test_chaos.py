"""`mailbench chaos` per queue backend: worker kills, a broker crash, API faults and a
rate limit, and still nothing accepted is lost — nor, with idempotency, sent twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.results.folder import load_run
from harness.services.brokers import BROKERS
from harness.services.settings import ENV_VARS, ServiceSettings
from servers.modes import MODES

pytestmark = pytest.mark.integration


@pytest.mark.timeout(400)  # RabbitMQ boots twice (~10 s each on a quiet machine)
@pytest.mark.parametrize("mode", ["sqlite", "redis", "rabbitmq", "postgres", "sqs"])
def test_chaos_loses_nothing_and_idempotency_prevents_duplicates(
    mode: str, tmp_path: Path, make_service_settings: Callable[[], ServiceSettings]
) -> None:
    # Brokers of its own (it crashes them), on private ports in a private directory.
    settings = make_service_settings()
    ports = [
        f"{name}={getattr(settings, f'{name}_port')}"
        for name in ("rabbitmq", "rabbitmq_dist", "epmd", "redis", "postgres", "sqs")
    ]
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS.values()}
    # Long enough for load after the broker is back: RabbitMQ restarts in ~10 s, and the
    # harness waits for it before it goes on.
    duration = 32 if mode == "rabbitmq" else 12
    argv = [sys.executable, "-m", "harness.cli", "chaos", "--modes", mode,
            "--duration", str(duration), "--users", "10", "--kill-workers", "5",
            "--api-faults", "500:0.04,502:0.03,503:0.03",
            "--rate-limit", "20:5", "--idempotency", "--out", str(tmp_path / "results"),
            "--services-dir", str(settings.base_dir), "--no-install"]  # fmt: skip
    for port in ports:
        argv += ["--port", port]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=420, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    run_dir = tmp_path / "results" / "latest"
    [accounted] = load_run(run_dir).accounting
    row = accounted.counts
    assert row.accepted > 50, row
    assert (row.lost, row.unexpected, row.duplicates) == (0, 0, 0), row
    assert row.delivered + row.dead_lettered == row.accepted

    # A broker that keeps its queues in memory alone (moto's SQS) is not restarted: the
    # event and the report say so, and nothing is counted as lost for it.
    service = MODES[mode].service
    restarts = 1 if service is None or BROKERS[service].keeps_data else 0
    if restarts:
        # The load went on after the broker restart: sends were accepted in its last seconds.
        late = [
            r
            for r in load_run(run_dir).timeseries
            if r.metric == "send" and r.second >= duration - 3
        ]
        assert sum(r.requests or 0 for r in late) > 0, late

    raw = run_dir / "raw" / mode
    events = [e["what"] for e in json.loads((raw / "chaos-events.json").read_text())]
    assert sum(e.startswith("SIGKILL worker") for e in events) == 5, events
    assert sum(e.startswith("restarted") for e in events) == restarts, events
    skipped = [e for e in events if e.startswith("broker restart skipped")]
    assert len(skipped) == 1 - restarts, events
    assert all(e in (run_dir / "report.md").read_text() for e in skipped)
    stats = json.loads((raw / "fakegun-stats.json").read_text())
    assert sum(stats["faults"].values()) > 0 and stats["rate_limited"] > 0, stats
    assert f"| {mode} |" in (run_dir / "chaos.md").read_text()
