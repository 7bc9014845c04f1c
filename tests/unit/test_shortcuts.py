"""The shortcut modes: the background kind's invariants, the background sender's tasks
and retries, and the naive worker's no-retry, auto-ack polling (doubles for the API
and the queue; the real broker and fake are in tests/integration/test_run_shortcuts.py)."""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from types import SimpleNamespace
from typing import Any

import pytest

from harness.run.config import DEFAULT_MODES
from queues.base import Email, Job, encode_job
from servers import modes
from servers.mailgun import MailgunSettings, Outcome, SendResult
from servers.metrics import Recorder
from servers.modes import MODES, Kind, Mode, parse_modes
from servers.naive import NaiveSettings, NaiveWorker
from servers.senders.background import BackgroundSender
from servers.senders.base import SenderContext
from servers.worker import WorkerSettings

OK = SendResult(Outcome.SUCCESS, 200, "<id@mailbench.test>")
FAIL_500 = SendResult(Outcome.RETRYABLE, 500, retry_after=0.0, detail="HTTP 500")


def job() -> Job:
    return Job(id=uuid.uuid4().hex, email=Email(to="a@example.com", subject="s", text="t"))


class ScriptedApi:
    """Answers each call with the next result (the last one for ever), optionally held
    until :attr:`gate` is set."""

    def __init__(self, *results: SendResult, gate: asyncio.Event | None = None) -> None:
        self.results = deque(results)
        self.gate = gate
        self.keys: list[str] = []

    async def send(self, email: Email, idempotency_key: str, *, inline: Any = ()) -> SendResult:
        self.keys.append(idempotency_key)
        if self.gate is not None:
            await self.gate.wait()
        return self.results.popleft() if len(self.results) > 1 else self.results[0]

    async def aclose(self) -> None:
        pass


def background(api: ScriptedApi, **policy: Any) -> BackgroundSender:
    sender = BackgroundSender(SenderContext(mailgun=MailgunSettings(), recorder=Recorder()))
    sender.client = api  # type: ignore[assignment]
    sender.policy = WorkerSettings(backend="", **policy)
    return sender


# -- the registry -------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        {"worker": "worker"},
        {"service": "rabbitmq"},
        {"queue_file": "sqlite:///{dir}/x.db"},
        {"lease_parameter": "lease"},
        {"blocks_event_loop": True},
    ],
)
def test_a_background_mode_has_no_queue_no_workers_and_never_blocks(extra: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="mode x"):
        Mode("x", Kind.BACKGROUND, "m:C", "t", "POST /send", "#000000", **extra)


def test_an_in_request_mode_has_no_lease() -> None:
    with pytest.raises(ValueError, match="lease"):
        Mode("x", Kind.IN_REQUEST, "m:C", "t", "POST /send", "#000000", lease_parameter="lease")


def test_the_kinds_say_who_sends_after_the_reply() -> None:
    assert MODES["background"].kind is Kind.BACKGROUND
    assert MODES["background"].sends_after_reply and not MODES["background"].queued
    assert MODES["naive"].queued and not MODES["naive"].retries
    assert not MODES["direct"].sends_after_reply and MODES["rabbitmq"].sends_after_reply
    assert "background" not in modes.IN_REQUEST


def test_shortcuts_are_a_group_and_never_run_by_default() -> None:
    assert parse_modes("shortcuts") == ("background", "naive")
    assert parse_modes("direct,shortcuts,naive") == ("direct", "background", "naive")
    for name in ("background", "naive"):
        assert name not in DEFAULT_MODES and name not in modes.QUEUED
    with pytest.raises(modes.ConfigError, match="shortcuts for background, naive"):
        parse_modes("shortcut")


# -- background ---------------------------------------------------------------------


async def test_background_answers_before_the_api_and_counts_what_is_in_flight() -> None:
    gate = asyncio.Event()
    api = ScriptedApi(OK, gate=gate)
    sender = background(api)
    handed = await sender.hand(job())
    assert handed.accepted and handed.status == 202
    await asyncio.sleep(0)
    assert await sender.depth() == 1 and api.keys  # the call is out, unanswered
    gate.set()
    await asyncio.sleep(0.01)
    assert await sender.depth() == 0 and sender.sent == 1
    assert sender.recorder.histograms["enqueue"].get_total_count() == 1
    assert sender.recorder.histograms["api"].get_total_count() == 1


async def test_background_retries_as_the_worker_with_the_same_idempotency_key() -> None:
    api = ScriptedApi(FAIL_500, FAIL_500, OK)
    sender = background(api)
    sent = job()
    await sender.hand(sent)
    await sender.aclose()
    assert api.keys == [sent.id] * 3 and sender.sent == 1 and sender.gave_up == 0


async def test_background_gives_up_after_the_workers_max_attempts() -> None:
    api = ScriptedApi(FAIL_500)
    sender = background(api, max_attempts=3)
    await sender.hand(job())
    await sender.aclose()
    assert len(api.keys) == 3 and sender.sent == 0 and sender.gave_up == 1


async def test_a_graceful_stop_waits_for_the_sends_in_flight_then_abandons_them() -> None:
    gate = asyncio.Event()
    sender = background(ScriptedApi(OK, gate=gate), drain_timeout=0.05)
    await sender.hand(job())
    await sender.aclose()  # the gate never opens: abandoned after the bound
    assert sender.sent == 0 and await sender.depth() == 0

    gate = asyncio.Event()
    sender = background(ScriptedApi(OK, gate=gate), drain_timeout=5)
    await sender.hand(job())
    asyncio.get_running_loop().call_later(0.05, gate.set)
    await sender.aclose()
    assert sender.sent == 1


# -- naive ----------------------------------------------------------------------------


class PolledQueue:
    """``basic.get`` on a list: what it hands out is gone (auto-ack)."""

    def __init__(self, jobs: list[Job]) -> None:
        self.messages = deque(SimpleNamespace(body=encode_job(j)) for j in jobs)
        self.gets: list[bool] = []

    async def get(self, *, no_ack: bool, fail: bool) -> Any:
        self.gets.append(no_ack)
        return self.messages.popleft() if self.messages else None


async def run_naive(queue: PolledQueue, api: ScriptedApi, seconds: float) -> NaiveWorker:
    settings = NaiveSettings(url="amqp://x", concurrency=4, idle_sleep_s=0.05)
    worker = NaiveWorker(settings, queue, api)  # type: ignore[arg-type]
    asyncio.get_running_loop().call_later(seconds, worker.stopping.set)
    await worker.run()
    return worker


async def test_naive_sends_once_and_never_looks_at_the_answer() -> None:
    jobs = [job() for _ in range(3)]
    api = ScriptedApi(FAIL_500, OK, FAIL_500)
    worker = await run_naive(PolledQueue(jobs), api, 0.3)
    assert sorted(api.keys) == sorted(j.id for j in jobs)  # one call each: no retry
    assert worker.taken == 3 and worker.statuses == {"500": 2, "200": 1}
    assert worker.recorder.histograms["api_retryable"].get_total_count() == 2


async def test_naive_polls_with_auto_ack_and_sleeps_when_the_queue_is_empty() -> None:
    queue = PolledQueue([job()])
    await run_naive(queue, ScriptedApi(OK), 0.3)
    assert all(queue.gets)  # no_ack=True on every get
    # One message, then an empty get every 0.05 s sleep: a few polls, not a busy loop.
    assert 2 <= len(queue.gets) <= 10


async def test_naive_takes_as_many_messages_to_wait_as_it_sends() -> None:
    """What it has taken and not sent is in its memory only (auto-ack): a kill's loss."""
    queue = PolledQueue([job() for _ in range(10)])
    api = ScriptedApi(OK, gate=asyncio.Event())  # no call ever answers
    settings = NaiveSettings(url="amqp://x", concurrency=2, idle_sleep_s=0.05)
    worker = NaiveWorker(settings, queue, api)  # type: ignore[arg-type]
    polling = asyncio.create_task(worker._poll())
    await asyncio.sleep(0.1)
    assert worker.taken == 4 and len(api.keys) == 2 and len(queue.messages) == 6
    polling.cancel()
    for task in (polling, *worker._sends):
        task.cancel()
    await asyncio.wait({polling, *worker._sends})
