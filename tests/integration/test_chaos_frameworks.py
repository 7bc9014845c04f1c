"""`mailbench chaos` on a framework's own worker: Dramatiq on Redis as its docs recommend
(acks after the actor ran, a heartbeat that chaos shortens, frequent maintenance) loses
nothing while its workers are SIGKILLed, Redis crashes and restarts, and the API fails.

Dramatiq fetches with one Lua script that moves a message to its worker's ack set, so a
crash leaves every accepted message somewhere it comes back from. Celery on Redis, the
other candidate, cannot promise that across a Redis crash (docs/frameworks.md: kombu pops
a message, then records it as unacknowledged, in two commands)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.results.folder import load_run
from harness.services.settings import ENV_VARS, ServiceSettings

pytestmark = pytest.mark.integration

MODE = "dramatiq-redis-reliable"


@pytest.mark.timeout(330)  # the drain waits out the killed workers' heartbeats
def test_a_reliable_framework_loses_nothing_under_chaos(
    tmp_path: Path, make_service_settings: Callable[[], ServiceSettings]
) -> None:
    settings = make_service_settings()  # a Redis of its own: chaos crashes it
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS.values()}
    argv = [sys.executable, "-m", "harness.cli", "chaos", "--modes", MODE,
            "--duration", "12", "--users", "10", "--kill-workers", "5",
            "--api-faults", "500:0.04,502:0.03,503:0.03", "--rate-limit", "",
            "--idempotency", "--out", str(tmp_path / "results"),
            "--services-dir", str(settings.base_dir), "--no-install",
            "--port", f"redis={settings.redis_port}"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    run_dir = tmp_path / "results" / "latest"
    row = load_run(run_dir).accounting_of(MODE)
    assert row is not None and row.accepted > 50, row
    assert (row.lost, row.unexpected) == (0, 0), row
    assert row.delivered + row.dead_lettered == row.accepted

    raw = run_dir / "raw" / MODE
    events = [e["what"] for e in json.loads((raw / "chaos-events.json").read_text())]
    assert sum(e.startswith("SIGKILL worker") for e in events) == 5, events
    assert sum(e.startswith("restarted redis") for e in events) == 1, events
    # The killed workers' tasks came back and were delivered: the API saw more calls than
    # emails accepted (retries of the faults, redeliveries of the killed workers' tasks).
    stats = json.loads((raw / "fakegun-stats.json").read_text())
    assert sum(stats["faults"].values()) > 0, stats
    assert "Task-queue frameworks" in (run_dir / "report.md").read_text()
