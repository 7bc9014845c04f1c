"""The shortcut modes end to end on a real broker, fake and servers: no loss when
nothing goes wrong, and each loss mechanism counted — never hidden — when it does.

Negative controls for the accounting: the fake answers 5xx, and ``naive`` (no retry, no
check) must report exactly that many lost; ``background``'s servers are SIGKILLed with
sends waiting out a backoff, and must report those as lost. A killed naive worker's loss
is counted where it happens: the messages the broker forgot and the API never got.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from harness.results.folder import load_run
from harness.services.settings import ENV_VARS
from queues.base import Email, Job
from queues.rabbitmq import AmqpDepth
from servers.fakegun.server import FakegunSettings, FakeMailgun
from servers.mailgun import MailgunSettings
from servers.metrics import Recorder
from servers.queue_url import QUEUE_URL_VAR
from servers.senders.base import SenderContext
from servers.senders.naive import NaiveSender

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

SHORTCUTS = ("background", "naive")


def mailbench(
    *argv: str, env: dict[str, str], timeout: float = 400
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *argv],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


def broker_env(rabbitmq_url: str) -> dict[str, str]:
    """The session's RabbitMQ handed over as a user's own; nothing else of theirs."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS.values()}
    return {**env, "AMQP_URL": rabbitmq_url, "CI": "true"}


@pytest.fixture(scope="module")
def shortcuts_run(tmp_path_factory: pytest.TempPathFactory, rabbitmq_url: str) -> Path:
    out = tmp_path_factory.mktemp("results")
    done = mailbench(
        "run", "--modes", "shortcuts", "--duration", "6", "--users", "10",
        "--latency", "fixed:0.05", "--out", str(out), env=broker_env(rabbitmq_url),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out / "latest"


@pytest.mark.parametrize("mode", SHORTCUTS)
def test_nothing_lost_when_nothing_goes_wrong(shortcuts_run: Path, mode: str) -> None:
    run = load_run(shortcuts_run)
    row = run.accounting_of(mode)
    assert row is not None and row.accepted > 0
    assert (row.lost, row.unexpected, row.duplicates) == (0, 0, 0), row
    assert row.delivered == row.accepted
    for metric in ("form", "send", "api", "delivery"):
        summary = run.row(mode, metric)
        assert summary is not None and summary.count > 0, metric


def test_naive_polling_shows_as_delivery_lag(shortcuts_run: Path) -> None:
    """The worker sleeps 5 s whenever it finds the queue empty (it does at least once, at
    the start): a 50 ms API call, and yet an email waits seconds; background's do not
    wait for a poll. How many wait depends on how often the queue runs empty, so on the
    machine's speed: the test asks for the longest wait and the order of the medians."""
    run = load_run(shortcuts_run)
    naive, background = run.row("naive", "delivery"), run.row("background", "delivery")
    assert naive is not None and background is not None
    assert naive.max_us > 2_000_000 and naive.p50_us > background.p50_us, (naive, background)


def test_report_explains_both(shortcuts_run: Path) -> None:
    report = (shortcuts_run / "report.md").read_text()
    for mode in SHORTCUTS:
        assert f"`{mode}` —" in report


def chaos(tmp_path: Path, env: dict[str, str], *argv: str) -> tuple[Path, str]:
    out = tmp_path / "results"
    done = mailbench(
        "chaos", "--users", "10", "--worker-procs", "1", "--rate-limit", "",
        "--out", str(out), *argv, env=env,
    )  # fmt: skip
    # Chaos exits 1 on any loss, which is what these runs are made to show.
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    return out / "latest", done.stdout


def test_naive_loses_exactly_the_emails_the_api_refused(tmp_path: Path, rabbitmq_url: str) -> None:
    run_dir, _ = chaos(
        tmp_path, broker_env(rabbitmq_url), "--modes", "naive", "--duration", "10",
        "--kill-workers", "0", "--no-restart-broker", "--api-faults", "500:0.2",
        "--latency", "fixed:0.05",
    )  # fmt: skip
    row = load_run(run_dir).accounting_of("naive")
    stats = json.loads((run_dir / "raw" / "naive" / "fakegun-stats.json").read_text())
    refused = stats["faults"]["500"]
    assert refused > 0 and row is not None and row.accepted > 0
    # Each 500 was an email sent once and never again: lost, and counted as lost.
    assert row.lost == refused, (row, stats)
    assert row.delivered == row.accepted - refused and row.dead_lettered == 0


async def test_a_killed_naive_worker_loses_what_it_had_taken(rabbitmq_url: str) -> None:
    """Thirty emails published by the naive sender; a real naive worker with five sends
    at once against a fake that holds every call: it takes five more to wait, so the
    broker has forgotten ten (auto-ack). SIGKILLed then, five had reached the API, and
    five are nowhere: lost."""
    name = f"naive-kill-{uuid.uuid4().hex}"
    context = SenderContext(
        mailgun=MailgunSettings(), recorder=Recorder(), queue_url=rabbitmq_url, queue_name=name
    )
    sender = await NaiveSender.open(context)
    for i in range(30):
        email = Email(to=f"kill-{i}@example.com", subject="s", text="t")
        assert (await sender.hand(Job(id=uuid.uuid4().hex, email=email))).accepted
    depth = AmqpDepth(rabbitmq_url, (name,))
    async with FakeMailgun(FakegunSettings(latency="fixed:20", seed=1)) as fake:
        worker = subprocess.Popen(
            [sys.executable, "-m", "harness.cli", "naive-worker", "--queue-name", name,
             "--concurrency", "5", "--mailgun-url", fake.url],
            env={**os.environ, QUEUE_URL_VAR: rabbitmq_url}, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 200
            while not (fake.in_flight == 5 and await depth.depth() == 20):
                assert worker.poll() is None and time.monotonic() < deadline
                await asyncio.sleep(0.2)
        finally:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        received = fake.stats()["received"]
        left = await depth.depth()
    await depth.close()
    assert (received, left) == (5, 20)  # ten taken, five of them never sent


def test_background_loses_its_sends_in_flight_with_its_server(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS.values()}
    # Half-way the servers are SIGKILLed (a background mode's "broker" is their memory).
    # Half the calls fail: at any moment sends wait out their backoff in the servers, and
    # those die with them (a call already posted is taken by the API even so).
    run_dir, stdout = chaos(
        tmp_path, env, "--modes", "background", "--duration", "30", "--kill-workers", "0",
        "--api-faults", "503:0.5", "--latency", "fixed:0.2",
    )  # fmt: skip
    row = load_run(run_dir).accounting_of("background")
    assert row is not None and row.accepted > 0
    assert row.lost > 0 and row.unexpected == 0, row
    assert row.delivered + row.lost == row.accepted
    assert "restarted the background servers" in stdout


def test_the_drain_waits_for_background_sends_in_flight(tmp_path: Path) -> None:
    """Sends of 8 s, load of 4 s: at the end of the load every send is still in flight;
    the drain sees them in the server's count and waits, so all are delivered before
    the server is stopped (none left for its graceful stop to wait for)."""
    out = tmp_path / "results"
    done = mailbench(
        "run", "--modes", "background", "--duration", "4", "--warmup", "1", "--users", "5",
        "--latency", "fixed:8", "--out", str(out), env={**os.environ, "CI": "true"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    row = load_run(out / "latest").accounting_of("background")
    assert row is not None and row.accepted > 0
    assert row.delivered == row.accepted and row.lost == 0, row
    waited = [line for line in done.stdout.splitlines() if "[background] draining:" in line]
    assert waited and "jobs queued" in waited[0], done.stdout[-2000:]
    log = (out / "latest" / "logs" / "background-server-0.log").read_text()
    assert "abandoned" not in log and "0 given up" in log
