"""End to end per queued mode: a short real run in which no accepted email is lost."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.results.folder import load_run

pytestmark = pytest.mark.integration

QUEUED = ("sqlite", "redis", "rabbitmq", "postgres", "sqs")


@pytest.fixture(scope="module")
def queued_run(
    tmp_path_factory: pytest.TempPathFactory,
    rabbitmq_url: str,
    redis_url: str,
    postgres_url: str,
    sqs_url: str,
) -> Path:
    out = tmp_path_factory.mktemp("results")
    # The session's brokers are handed over as a user's own brokers would be.
    env = {**os.environ, "AMQP_URL": rabbitmq_url, "REDIS_URL": redis_url,
           "DATABASE_URL": postgres_url, "SQS_URL": sqs_url, "CI": "true"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", "--modes", ",".join(QUEUED),
         "--duration", "5", "--users", "20", "--latency", "fixed:0.05", "--out", str(out)],
        capture_output=True, text=True, timeout=400, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return out / "latest"


@pytest.mark.parametrize("mode", QUEUED)
def test_nothing_lost(queued_run: Path, mode: str) -> None:
    run = load_run(queued_run)
    row = run.accounting_of(mode)
    assert row is not None and row.accepted > 0
    assert row.lost == 0 and row.unexpected == 0, row
    assert row.delivered == row.accepted
    for metric in ("form", "send", "api", "delivery", "queue_wait"):
        summary = run.row(mode, metric)
        assert summary is not None and summary.count > 0, metric
    # Queued sends answer long before the 50 ms API call would.
    send, api = run.row(mode, "send"), run.row(mode, "api")
    assert send is not None and api is not None
    assert send.p50_us < api.p50_us


def test_report_explains_every_mode(queued_run: Path) -> None:
    report = (queued_run / "report.md").read_text()
    for mode in QUEUED:
        assert f"`{mode}` —" in report
