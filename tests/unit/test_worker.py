"""The queue worker on the in-memory backend, against a scripted Mailgun double."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import respx

from harness import cli
from harness.errors import ConfigError, QueueError, ServiceUnavailable, UnknownBackend
from queues import open_queue
from queues.base import Delivery, Email, Job
from queues.memory import MemoryQueue
from servers.mailgun import Outcome, SendResult
from servers.metrics import decode
from servers.phases import MAIN, write_control
from servers.worker import (
    Worker,
    WorkerSettings,
    add_cli_arguments,
    backoff_delay,
    cli_main,
)

OK = SendResult(Outcome.SUCCESS, 200, message_id="<1@mailbench.test>")
UNAVAILABLE = SendResult(Outcome.RETRYABLE, 503, detail="503: Service Unavailable")
BAD_ADDRESS = SendResult(
    Outcome.PERMANENT, 400, detail="400: 'to' parameter is not a valid address"
)


def rate_limited(retry_after: float) -> SendResult:
    return SendResult(Outcome.RETRYABLE, 429, retry_after=retry_after, detail="429: slow down")


class FakeMailgun:
    """Answers calls in order from a script (then ``default``) and records every call."""

    def __init__(
        self, *answers: SendResult | Exception, default: SendResult = OK, delay: float = 0.0
    ) -> None:
        self.answers: deque[SendResult | Exception] = deque(answers)
        self.default = default
        self.delay = delay
        self.gate: asyncio.Event | None = None
        self.by_key: dict[str, SendResult] = {}  # answers for given jobs, before the script
        self.calls: list[tuple[str, Email]] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def send(self, email: Email, idempotency_key: str) -> SendResult:
        self.calls.append((idempotency_key, email))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.delay:
                await asyncio.sleep(self.delay)
            if idempotency_key in self.by_key:
                return self.by_key[idempotency_key]
            answer = self.answers.popleft() if self.answers else self.default
            if isinstance(answer, Exception):
                raise answer
            return answer
        finally:
            self.in_flight -= 1


class SpyQueue:
    """A memory queue that records what the worker received and how it settled it."""

    def __init__(self, inner: MemoryQueue) -> None:
        self.inner = inner
        self.received: list[Delivery] = []
        self.retries: list[tuple[str, int, float]] = []  # job id, attempt, delay
        self.fail_ack: Exception | None = None
        self.handed_back: list[Delivery] = []

    async def enqueue(self, job: Job) -> None:
        await self.inner.enqueue(job)

    async def consume(self, prefetch: int) -> AsyncIterator[Delivery]:
        deliveries = self.inner.consume(prefetch)
        try:
            async for delivery in deliveries:
                self.received.append(delivery)
                yield delivery
        finally:
            await deliveries.aclose()  # type: ignore[attr-defined]

    async def ack(self, delivery: Delivery) -> None:
        if self.fail_ack is not None:
            raise self.fail_ack
        await self.inner.ack(delivery)

    async def retry(self, delivery: Delivery, delay: float) -> None:
        self.retries.append((delivery.job.id, delivery.job.attempt, delay))
        await self.inner.retry(delivery, delay)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        await self.inner.dead_letter(delivery, reason)

    async def hand_back(self, delivery: Delivery) -> None:
        self.handed_back.append(delivery)
        await self.inner.hand_back(delivery)

    async def depth(self) -> int:
        return await self.inner.depth()

    async def dead_letters(self) -> int:
        return await self.inner.dead_letters()

    async def close(self) -> None:
        await self.inner.close()


@pytest.fixture
def backend() -> str:
    return f"memory://{uuid.uuid4().hex}"


@pytest.fixture
async def queue(backend: str) -> AsyncIterator[SpyQueue]:
    inner = await open_queue(backend)
    assert isinstance(inner, MemoryQueue)
    spy = SpyQueue(inner)
    yield spy
    await spy.close()


def make_settings(backend: str, **overrides: object) -> WorkerSettings:
    values: dict[str, object] = {
        "backend": backend,
        "concurrency": 10,
        "backoff_base": 0.001,
        "backoff_cap": 0.002,
        "drain_timeout": 2.0,
    }
    values.update(overrides)
    return WorkerSettings(**values)  # type: ignore[arg-type]


def make_job(n: int = 0, *, age: float = 0.0) -> Job:
    email = Email(to=f"user{n}@example.com", subject=f"hello {n}", text="body")
    return Job(id=uuid.uuid4().hex, email=email, enqueued_at=time.time() - age)


async def enqueue(queue: SpyQueue, count: int, *, age: float = 0.0) -> list[Job]:
    jobs = [make_job(n, age=age) for n in range(count)]
    for job in jobs:
        await queue.enqueue(job)
    return jobs


async def wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


@asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(worker.run())
    try:
        yield task
    finally:
        await worker.stop()
        await task


def counts(worker: Worker, name: str) -> int:
    histogram = worker.recorder.histograms.get(name)
    return 0 if histogram is None else int(histogram.get_total_count())


async def test_success_acks_and_records_api_and_queue_wait(backend: str, queue: SpyQueue) -> None:
    jobs = await enqueue(queue, 3, age=2.0)
    client = FakeMailgun(delay=0.01)
    worker = Worker(make_settings(backend), queue, client)
    async with running(worker):
        await wait_until(lambda: worker.acked == 3)
    assert await queue.depth() == 0
    assert sorted(key for key, _ in client.calls) == sorted(job.id for job in jobs)
    assert {email for _, email in client.calls} == {job.email for job in jobs}
    assert counts(worker, "api") == 3
    assert worker.recorder.histograms["api"].get_min_value() >= 9_000
    assert counts(worker, "queue_wait") == 3
    assert worker.recorder.histograms["queue_wait"].get_min_value() >= 1_900_000
    assert worker.retried == 0 and worker.dead_lettered == [] and not worker.errors


async def test_retryable_then_success_keeps_the_idempotency_key(
    backend: str, queue: SpyQueue
) -> None:
    [job] = await enqueue(queue, 1)
    client = FakeMailgun(UNAVAILABLE, OK)
    worker = Worker(make_settings(backend), queue, client)
    async with running(worker):
        await wait_until(lambda: worker.acked == 1)
    assert [key for key, _ in client.calls] == [job.id, job.id]
    assert [d.job.attempt for d in queue.received] == [0, 1]
    assert [r[:2] for r in queue.retries] == [(job.id, 0)]
    assert 0.0 <= queue.retries[0][2] <= 0.001
    assert worker.retried == 1
    assert worker.errors == {"retryable 503": 1}
    assert (counts(worker, "api"), counts(worker, "api_retryable")) == (1, 1)
    assert counts(worker, "queue_wait") == 1
    assert await queue.depth() == 0


async def test_queue_wait_is_measured_to_the_first_claim_only(
    backend: str, queue: SpyQueue
) -> None:
    await enqueue(queue, 1)
    # The retry comes back after 0.3 s of backoff: that is the retry's delay, not time
    # the job waited for a free worker.
    client = FakeMailgun(
        SendResult(Outcome.RETRYABLE, 503, retry_after=0.3, detail="503: later"), OK
    )
    worker = Worker(make_settings(backend), queue, client)
    async with running(worker):
        await wait_until(lambda: worker.acked == 1)
    assert [d.job.attempt for d in queue.received] == [0, 1]
    assert counts(worker, "queue_wait") == 1
    assert worker.recorder.histograms["queue_wait"].get_max_value() < 300_000


async def test_api_calls_are_recorded_by_outcome(backend: str, queue: SpyQueue) -> None:
    retried, refused = await enqueue(queue, 2)
    client = FakeMailgun()
    client.by_key[refused.id] = BAD_ADDRESS
    client.answers.extend([rate_limited(0.001), UNAVAILABLE])  # then OK, for `retried`
    worker = Worker(make_settings(backend, concurrency=1), queue, client)
    async with running(worker):
        await wait_until(lambda: worker.acked == 1 and len(worker.dead_lettered) == 1)
    assert sorted(key for key, _ in client.calls) == sorted([retried.id] * 3 + [refused.id])
    # Only the call the API accepted is an `api` time; an instant 429 or an injected 503
    # would drag its median down, and a refusal says nothing about the send's cost.
    assert {name: counts(worker, name) for name in worker.recorder.histograms} == {
        "api": 1,
        "api_rate_limited": 1,
        "api_retryable": 1,
        "api_failed": 1,
        "queue_wait": 2,
    }


async def test_a_429_is_waited_out_in_place_without_spending_an_attempt(
    backend: str, queue: SpyQueue
) -> None:
    [job] = await enqueue(queue, 1)
    client = FakeMailgun(rate_limited(0.03), rate_limited(0.03), OK)
    # A backoff this large would make the test time out if the worker ignored Retry-After.
    settings = make_settings(backend, backoff_base=100.0, backoff_cap=100.0)
    worker = Worker(settings, queue, client)
    started = time.monotonic()
    async with running(worker):
        await wait_until(lambda: worker.acked == 1)
    assert time.monotonic() - started >= 0.06  # both Retry-After waits were kept
    assert [key for key, _ in client.calls] == [job.id] * 3
    assert queue.retries == []  # never handed back to the queue
    assert [d.job.attempt for d in queue.received] == [0]
    assert worker.rate_limited == 2
    assert worker.errors == {"retryable 429": 2}


async def test_a_lasting_rate_limit_hands_the_job_back_after_retry_after(
    backend: str, queue: SpyQueue
) -> None:
    [job] = await enqueue(queue, 1)
    client = FakeMailgun(rate_limited(0.01), rate_limited(0.01), rate_limited(0.02), OK)
    settings = make_settings(backend, backoff_base=100.0, backoff_cap=100.0, rate_limit_waits=2)
    worker = Worker(settings, queue, client)
    async with running(worker):
        await wait_until(lambda: worker.acked == 1)
    assert [r[:2] for r in queue.retries] == [(job.id, 0)]
    assert [delay for *_, delay in queue.retries] == [0.02]
    assert [d.job.attempt for d in queue.received] == [0, 1]
    assert worker.rate_limited == 2 and worker.retried == 1


async def test_permanent_failure_goes_to_the_dead_letter(backend: str, queue: SpyQueue) -> None:
    [job] = await enqueue(queue, 1)
    client = FakeMailgun(BAD_ADDRESS)
    worker = Worker(make_settings(backend), queue, client)
    async with running(worker):
        await wait_until(lambda: len(worker.dead_lettered) == 1)
    assert worker.dead_lettered == [(job.id, BAD_ADDRESS.detail)]
    [dead] = queue.inner.dead_lettered()
    assert dead.job == job and dead.reason == BAD_ADDRESS.detail
    assert len(client.calls) == 1
    assert worker.acked == 0 and worker.retried == 0
    assert await queue.depth() == 0


async def test_gives_up_after_max_attempts(backend: str, queue: SpyQueue) -> None:
    [job] = await enqueue(queue, 1)
    client = FakeMailgun(default=UNAVAILABLE)
    worker = Worker(make_settings(backend, max_attempts=3), queue, client)
    async with running(worker):
        await wait_until(lambda: len(worker.dead_lettered) == 1)
    reason = "gave up after 3 attempts: 503: Service Unavailable"
    assert worker.dead_lettered == [(job.id, reason)]
    assert [dead.reason for dead in queue.inner.dead_lettered()] == [reason]
    assert [key for key, _ in client.calls] == [job.id] * 3
    assert [attempt for _, attempt, _ in queue.retries] == [0, 1]
    assert worker.retried == 2
    assert await queue.depth() == 0


async def test_at_most_concurrency_calls_in_flight(backend: str, queue: SpyQueue) -> None:
    await enqueue(queue, 30)
    client = FakeMailgun(delay=0.01)
    worker = Worker(make_settings(backend, concurrency=4, prefetch=8), queue, client)
    async with running(worker):
        await wait_until(lambda: worker.acked == 30)
    assert client.max_in_flight == 4
    assert len(client.calls) == 30


async def test_an_exception_in_the_client_does_not_lose_the_job(
    backend: str, queue: SpyQueue
) -> None:
    [job] = await enqueue(queue, 1)
    client = FakeMailgun(RuntimeError("boom"), OK)
    worker = Worker(make_settings(backend), queue, client)
    async with running(worker) as task:
        await wait_until(lambda: worker.acked == 1)
        assert not task.done()
    assert [key for key, _ in client.calls] == [job.id, job.id]
    assert [attempt for _, attempt, _ in queue.retries] == [0]
    assert worker.errors == {"exception RuntimeError": 1}
    assert await queue.depth() == 0


async def test_a_client_that_always_raises_ends_in_the_dead_letter(
    backend: str, queue: SpyQueue
) -> None:
    [job] = await enqueue(queue, 1)
    client = FakeMailgun(default=UNAVAILABLE)
    client.answers.extend([ValueError("bad"), ValueError("bad")])
    worker = Worker(make_settings(backend, max_attempts=2), queue, client)
    async with running(worker):
        await wait_until(lambda: len(worker.dead_lettered) == 1)
    assert worker.dead_lettered == [
        (job.id, "gave up after 2 attempts: unexpected error: ValueError('bad')")
    ]


async def test_a_failed_settle_leaves_the_job_to_the_queue(backend: str, queue: SpyQueue) -> None:
    await enqueue(queue, 1)
    queue.fail_ack = QueueError("the broker went away")
    client = FakeMailgun()
    worker = Worker(make_settings(backend), queue, client)
    async with running(worker):
        await wait_until(lambda: worker.errors["settle QueueError"] == 1)
    assert worker.acked == 0 and queue.retries == [] and worker.dead_lettered == []
    await queue.close()
    assert await queue.depth() == 1  # redelivered later, never lost


async def test_graceful_stop_finishes_calls_in_flight(backend: str, queue: SpyQueue) -> None:
    await enqueue(queue, 5)
    client = FakeMailgun()
    client.gate = asyncio.Event()
    worker = Worker(make_settings(backend, concurrency=2), queue, client)
    task = asyncio.create_task(worker.run())
    await wait_until(lambda: client.in_flight == 2)
    stopping = asyncio.create_task(worker.stop())
    await asyncio.sleep(0.01)
    assert not stopping.done()  # waits for the calls in flight
    client.gate.set()
    await stopping
    await task
    assert worker.acked == 2
    assert len(client.calls) == 2  # nothing new was taken after the stop
    await queue.close()
    assert await queue.depth() == 3


async def test_stop_hands_back_at_once_what_was_never_started(
    backend: str, queue: SpyQueue
) -> None:
    jobs = await enqueue(queue, 4)
    client = FakeMailgun()
    client.gate = asyncio.Event()
    worker = Worker(make_settings(backend, concurrency=1, prefetch=10), queue, client)
    task = asyncio.create_task(worker.run())
    await wait_until(lambda: client.in_flight == 1 and len(queue.received) == 4)
    stopping = asyncio.create_task(worker.stop())
    # Another worker has the three never started while this one still drains its call:
    # they do not wait for its queue to close (on Redis and SQL: for a lease to expire).
    other = await open_queue(backend)
    deliveries = other.consume(prefetch=10)
    others = [await asyncio.wait_for(anext(deliveries), 2) for _ in range(3)]
    assert not stopping.done()
    [(in_flight, _)] = client.calls
    assert {d.job.id for d in others} == {job.id for job in jobs} - {in_flight}
    assert [(d.deliveries, d.job.attempt) for d in others] == [(1, 0)] * 3  # uncounted
    client.gate.set()
    await stopping
    await task
    assert worker.acked == 1 and worker.handed_back == 3 and len(queue.handed_back) == 3
    for delivery in others:
        await other.ack(delivery)
    await other.close()


async def crash_deliveries(backend: str, job: Job, crashes: int) -> None:
    """Deliver ``job`` (enqueued) ``crashes`` times to consumers that die holding it."""
    for _ in range(crashes):
        doomed = await open_queue(backend)
        assert isinstance(doomed, MemoryQueue)
        await asyncio.wait_for(anext(doomed.consume(prefetch=1)), 2)
        doomed.requeue_unacked()


async def test_a_job_delivered_beyond_max_deliveries_is_dead_lettered_uncalled(
    backend: str, queue: SpyQueue
) -> None:
    [poison] = await enqueue(queue, 1)
    await crash_deliveries(backend, poison, 3)  # it killed three workers
    client = FakeMailgun()
    worker = Worker(make_settings(backend, max_deliveries=3), queue, client)
    async with running(worker):
        await wait_until(lambda: len(worker.dead_lettered) == 1)
    assert client.calls == []
    [(job_id, reason)] = worker.dead_lettered
    assert job_id == poison.id
    assert "delivered 4 times" in reason and "--max-deliveries 3" in reason
    [dead] = queue.inner.dead_lettered()
    assert dead.reason == reason
    assert await queue.depth() == 0


async def test_a_job_on_its_last_delivery_is_sent_alone(backend: str, queue: SpyQueue) -> None:
    [suspect] = await enqueue(queue, 1)
    await crash_deliveries(backend, suspect, 1)
    holder = await open_queue(backend)
    assert isinstance(holder, MemoryQueue)
    await asyncio.wait_for(anext(holder.consume(prefetch=1)), 2)
    others = await enqueue(queue, 4)
    holder.requeue_unacked()  # after the others, on its third delivery
    alone: list[int] = []

    class Recording(FakeMailgun):
        async def send(self, email: Email, idempotency_key: str) -> SendResult:
            if idempotency_key == suspect.id:
                alone.append(self.in_flight)
            return await super().send(email, idempotency_key)

    client = Recording(delay=0.05)
    settings = make_settings(backend, concurrency=2, prefetch=10, max_deliveries=3)
    worker = Worker(settings, queue, client)
    async with running(worker):
        await wait_until(lambda: worker.acked == 5)
    assert alone == [0]  # nothing else in flight when its call began
    assert sorted(key for key, _ in client.calls) == sorted(j.id for j in [suspect, *others])
    # What it held unstarted went back uncounted, and was sent afterwards.
    assert queue.handed_back and all(d.deliveries == 1 for d in queue.handed_back)
    assert worker.dead_lettered == []
    assert await queue.depth() == 0


async def test_a_stop_hands_back_a_job_waiting_to_be_sent_alone(
    backend: str, queue: SpyQueue
) -> None:
    [suspect] = await enqueue(queue, 1)
    holder = await open_queue(backend)
    assert isinstance(holder, MemoryQueue)
    await asyncio.wait_for(anext(holder.consume(prefetch=1)), 2)
    [busy] = await enqueue(queue, 1)
    client = FakeMailgun()
    client.gate = asyncio.Event()
    settings = make_settings(backend, concurrency=2, prefetch=10, max_deliveries=2)
    worker = Worker(settings, queue, client)
    task = asyncio.create_task(worker.run())
    await wait_until(lambda: client.in_flight == 1)  # the other job, held up by the API
    holder.requeue_unacked()  # the suspect's consumer "dies": its last delivery is next
    await wait_until(lambda: len(queue.received) == 2)
    stopping = asyncio.create_task(worker.stop())
    await wait_until(lambda: len(queue.handed_back) == 1)
    [handed_back] = queue.handed_back
    assert (handed_back.job.id, handed_back.deliveries) == (suspect.id, 2)
    client.gate.set()
    await stopping
    await task
    assert [key for key, _ in client.calls] == [busy.id] and worker.acked == 1


async def test_drain_timeout_leaves_unsettled_jobs_on_the_queue(
    backend: str, queue: SpyQueue
) -> None:
    await enqueue(queue, 5)
    client = FakeMailgun()
    client.gate = asyncio.Event()  # never set: the API hangs
    worker = Worker(make_settings(backend, concurrency=3, drain_timeout=0.05), queue, client)
    task = asyncio.create_task(worker.run())
    await wait_until(lambda: client.in_flight == 3)
    started = time.monotonic()
    await worker.stop()
    await task
    assert time.monotonic() - started < 1.0
    assert worker.acked == 0 and worker.retried == 0 and worker.dead_lettered == []
    assert worker.in_flight == 0
    await queue.close()
    assert await queue.depth() == 5


async def test_run_ends_with_the_queue_error(backend: str, tmp_path: Path) -> None:
    class BrokenQueue(SpyQueue):
        async def consume(self, prefetch: int) -> AsyncIterator[Delivery]:
            raise ServiceUnavailable("RabbitMQ is not reachable at amqp://127.0.0.1:5673.")
            yield  # pragma: no cover

    inner = await open_queue(backend)
    assert isinstance(inner, MemoryQueue)
    out = tmp_path / "worker.json"
    worker = Worker(make_settings(backend, metrics_out=out), BrokenQueue(inner), FakeMailgun())
    with pytest.raises(ServiceUnavailable):
        await worker.run()
    assert json.loads(out.read_text())["acked"] == 0  # metrics are written all the same


async def test_metrics_file(backend: str, queue: SpyQueue, tmp_path: Path) -> None:
    ok_job, bad_job = await enqueue(queue, 2)
    out = tmp_path / "metrics" / "worker.json"
    journal = tmp_path / "dead-letters.jsonl"
    client = FakeMailgun()
    client.by_key[bad_job.id] = BAD_ADDRESS
    settings = make_settings(backend, metrics_out=out, dead_letters_out=journal)
    worker = Worker(settings, queue, client)
    async with running(worker):
        await wait_until(lambda: worker.acked == 1 and len(worker.dead_lettered) == 1)
        # The journal is written as the dead letter happens, not at shutdown.
        [line] = journal.read_text().splitlines()
    assert json.loads(line) == {
        "id": bad_job.id,
        "to": bad_job.email.to,
        "reason": BAD_ADDRESS.detail,
    }
    data = json.loads(out.read_text())
    expected = {"histograms", "acked", "retried", "rate_limited", "dead_lettered", "errors"}
    assert set(data) == expected | {"handed_back", "phase", "begins_at"}
    assert (data["phase"], data["begins_at"]) == (".", None)  # one phase: the main one
    assert data["acked"] == 1
    assert data["retried"] == 0
    assert data["dead_lettered"] == [[bad_job.id, BAD_ADDRESS.detail]]
    assert data["errors"] == {"permanent 400": 1}
    assert set(data["histograms"]) == {"api", "api_failed", "queue_wait"}
    assert decode(data["histograms"]["api"]).get_total_count() == 1
    assert decode(data["histograms"]["api_failed"]).get_total_count() == 1
    assert decode(data["histograms"]["queue_wait"]).get_total_count() == 2
    assert list(out.parent.iterdir()) == [out]  # no temporary file left behind
    assert ok_job.id in {key for key, _ in client.calls}


async def test_figures_are_kept_per_phase_of_the_run(
    backend: str, queue: SpyQueue, tmp_path: Path
) -> None:
    control, out = tmp_path / "phases.json", tmp_path / "worker-0.json"
    write_control(control, [("warmup", None)])
    worker = Worker(
        make_settings(backend, metrics_out=out, phase_file=control), queue, FakeMailgun()
    )
    phases: list[tuple[str, float | None]] = [("warmup", None)]
    async with running(worker):
        for folder, jobs in (("warmup", 3), (MAIN, 2), ("sweep/step-00", 4)):
            if folder != "warmup":
                phases.append((folder, time.time()))
                write_control(control, phases)
                await wait_until(lambda f=folder: worker.recorder.current == f)
            done = worker.acked + jobs
            await enqueue(queue, jobs)
            await wait_until(lambda n=done: worker.acked == n)

    def api_calls(path: Path) -> int:
        return int(decode(json.loads(path.read_text())["histograms"]["api"]).get_total_count())

    assert api_calls(tmp_path / "warmup" / "worker-0.json") == 3
    assert api_calls(out) == 2  # the main phase's calls only
    assert api_calls(tmp_path / "sweep" / "step-00" / "worker-0.json") == 4
    assert json.loads(out.read_text())["acked"] == 9  # counts are the worker's whole life


async def test_a_call_in_flight_at_a_boundary_stays_with_the_phase_it_began_in(
    backend: str, queue: SpyQueue, tmp_path: Path
) -> None:
    control, out = tmp_path / "phases.json", tmp_path / "worker-0.json"
    write_control(control, [("warmup", None)])
    client = FakeMailgun()
    client.gate = asyncio.Event()
    worker = Worker(make_settings(backend, metrics_out=out, phase_file=control), queue, client)
    async with running(worker):
        await enqueue(queue, 1)
        await wait_until(lambda: client.in_flight == 1)
        write_control(control, [("warmup", None), (MAIN, time.time())])
        await wait_until(lambda: worker.recorder.current == MAIN)
        client.gate.set()
        await wait_until(lambda: worker.acked == 1)
    warmup = json.loads((tmp_path / "warmup" / "worker-0.json").read_text())["histograms"]
    assert set(warmup) == {"api", "queue_wait"}
    assert json.loads(out.read_text())["histograms"] == {}


class TopRandom(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b


def test_backoff_is_full_jitter_capped_exponential() -> None:
    top = TopRandom()
    assert [backoff_delay(n, 1.0, 30.0, top) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff_delay(10_000, 1.0, 30.0, top) == 30.0
    rng = random.Random(7)
    delays = [backoff_delay(3, 1.0, 30.0, rng) for _ in range(200)]
    assert all(0.0 <= d <= 8.0 for d in delays)
    assert min(delays) < 2.0 and max(delays) > 6.0  # spread over the whole range


def test_settings_defaults_and_validation() -> None:
    settings = WorkerSettings(backend="memory://")
    assert settings.concurrency == 200 and settings.prefetch_count == 250
    assert settings.max_attempts == 5 and settings.max_deliveries == 5
    assert settings.inject_crash_subject is None
    assert (settings.backoff_base, settings.backoff_cap) == (1.0, 30.0)
    assert settings.drain_seconds == settings.mailgun.timeout + 5.0
    assert WorkerSettings(backend="memory://", concurrency=3).prefetch_count == 4
    with pytest.raises(ConfigError, match="concurrency"):
        WorkerSettings(backend="memory://", concurrency=0)
    with pytest.raises(ConfigError, match="max deliveries"):
        WorkerSettings(backend="memory://", max_deliveries=0)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    return parser.parse_args(argv)


def test_cli_defaults() -> None:
    args = parse("--backend", "memory://")
    assert args.concurrency == 200 and args.prefetch is None and args.max_attempts == 5
    assert args.mailgun_url == "http://127.0.0.1:8025"
    assert (args.mailgun_key, args.mailgun_domain) == ("key-mailbench", "mailbench.test")
    assert args.metrics_out is None
    assert args.max_deliveries == 5 and args.inject_crash_subject is None
    args = parse("--backend", "memory://", "--max-deliveries", "2", "--inject-crash-subject", "x")
    assert (args.max_deliveries, args.inject_crash_subject) == (2, "x")


def test_cli_runs_until_sigterm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], backend: str
) -> None:
    async def seed() -> MemoryQueue:
        queue = await open_queue(backend)
        assert isinstance(queue, MemoryQueue)
        await queue.enqueue(make_job())
        return queue

    queue = asyncio.run(seed())
    out = tmp_path / "worker.json"
    args = parse(
        "--backend", backend, "--concurrency", "7", "--metrics-out", str(out),
        "--mailgun-url", "http://fakegun.test",
    )  # fmt: skip

    def terminate_when_drained() -> None:
        deadline = time.monotonic() + 5
        while asyncio.run(queue.depth()) and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGTERM)

    with respx.mock(using="httpx", assert_all_called=True) as api:
        route = api.post("http://fakegun.test/v3/mailbench.test/messages").respond(
            200, json={"id": "<1@mailbench.test>", "message": "Queued. Thank you."}
        )
        killer = threading.Thread(target=terminate_when_drained)
        killer.start()
        try:
            assert cli_main(args) == 0
        finally:
            killer.join()
    assert route.call_count == 1
    assert capsys.readouterr().out == f"mailbench worker consuming {backend} with concurrency 7\n"
    assert json.loads(out.read_text())["acked"] == 1


def test_cli_reports_an_unknown_backend_in_one_sentence(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(UnknownBackend):
        cli_main(parse("--backend", "nope://x"))
    assert cli.main(["worker", "--backend", "nope://x"]) == 2
    assert "no queue backend for 'nope://x'" in capsys.readouterr().err
