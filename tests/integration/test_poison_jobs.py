"""Poison jobs and shutdown with real ``mailbench worker`` processes on every broker.

A poison job is one that kills the worker about to send it (planted here with the
worker's ``--inject-crash-subject``). Its worker dies before any API call, so the job's
attempts never grow; only the broker's count of its deliveries does. A supervisor (this
test, as ``mailbench chaos`` does) restarts each worker that dies. The poison must end
in the dead letter after ``--max-deliveries`` deliveries, every other job must reach the
fake Mailgun, and nothing may be lost. ``mailbench run`` and ``mailbench chaos`` supervise
their workers the same way, and their drain waits a lease longer per worker replaced.

RabbitMQ counts deliveries in the ``x-delivery-count`` header of a quorum queue; its
tests pass once the RabbitMQ backend fills :attr:`queues.base.Delivery.deliveries` from
it and implements ``hand_back``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness.process import Child, Children, mailbench_command
from harness.results.accounting import reconcile
from harness.results.collect import LOCUST_FILE
from harness.run.drain import drain
from harness.run.tiers import Tiers
from queues import Delivery, Email, Job, Queue, open_queue
from servers.fakegun.admin import FakegunAdmin
from servers.mailgun import BlockingMailgunClient, MailgunSettings
from servers.worker import CRASH_EXIT_CODE

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

BACKENDS = ("redis", "sqlite", "postgres", "rabbitmq", "sqs")
POISON = "this subject crashes the worker"
MAX_DELIVERIES = 3
GOOD_JOBS = 20
TIMEOUT = 60.0  # generous: three crashes, three one-second leases, five worker starts


def with_query(url: str, query: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{query}"


@dataclass
class Broker:
    kind: str
    url: str  # a dead worker's jobs come back after a second (a long lease: never)
    long_lease_url: str
    name: str = field(default_factory=lambda: f"poison-{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=BACKENDS)
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Broker:
    kind: str = request.param
    if kind == "sqlite":
        base = f"sqlite:///{tmp_path / 'jobs.db'}"
        return Broker(kind, f"{base}?lease=1&poll=0.05", f"{base}?lease=60&poll=0.05")
    url = request.getfixturevalue(f"{kind}_url")
    if kind in ("redis", "sqs"):
        return Broker(
            kind,
            with_query(url, f"visibility=1&poll={1 if kind == 'sqs' else 0.1}"),
            with_query(url, "visibility=60"),
        )
    if kind == "postgres":
        return Broker(kind, with_query(url, "lease=1&poll=0.1"), with_query(url, "lease=60"))
    return Broker(kind, url, url)  # RabbitMQ returns a dead consumer's messages at once


@pytest.fixture
def children() -> Iterator[Children]:
    with Children() as started:
        yield started


def start_fake(children: Children, logs: Path, latency: str) -> FakegunAdmin:
    port_file = logs / "fakegun.port"
    argv = ["fakegun", "--port", "0", "--port-file", str(port_file), "--latency", latency]
    child = children.start("fakegun", mailbench_command(*argv), logs / "fakegun.log")
    fake = FakegunAdmin(f"http://127.0.0.1:{child.wait_port_file(port_file)}")
    child.wait_http(f"{fake.url}/_mailbench/stats")
    return fake


def worker_command(url: str, name: str, fake: FakegunAdmin, *options: str) -> list[str]:
    """One place that knows how a worker is told its queue."""
    args = ["worker", "--backend", url, "--queue-name", name, "--mailgun-url", fake.url]
    return mailbench_command(*args, *options)


def make_job(to: str, subject: str) -> Job:
    return Job(id=uuid.uuid4().hex, email=Email(to=to, subject=subject, text="hello"))


async def enqueue(url: str, name: str, jobs: list[Job]) -> None:
    queue = await open_queue(url, name)
    try:
        for job in jobs:
            await queue.enqueue(job)
    finally:
        await queue.close()


async def queue_counts(url: str, name: str) -> tuple[int, int]:
    queue = await open_queue(url, name)
    try:
        return await queue.depth(), await queue.dead_letters()
    finally:
        await queue.close()


def recipients(fake: FakegunAdmin) -> list[str]:
    return [str(entry["recipients"][0]) for entry in fake.ledger()]


def test_a_poison_job_is_dead_lettered_after_max_deliveries_and_nothing_is_lost(
    broker: Broker, children: Children, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    fake = start_fake(children, logs, "fixed:0.02")
    good = [make_job(f"good{n}@example.com", f"hello {n}") for n in range(GOOD_JOBS)]
    poison = make_job("poison@example.com", POISON)
    # In the middle of the batch: the workers hold good jobs when it kills them.
    jobs = [*good[: GOOD_JOBS // 2], poison, *good[GOOD_JOBS // 2 :]]
    asyncio.run(enqueue(broker.url, broker.name, jobs))

    started = 0

    def start_worker() -> Child:
        nonlocal started
        started += 1
        options = ["--concurrency", "8", "--max-deliveries", str(MAX_DELIVERIES)]
        options += ["--inject-crash-subject", POISON]
        options += ["--dead-letters-out", str(tmp_path / f"dead-letters-{started}.jsonl")]
        command = worker_command(broker.url, broker.name, fake, *options)
        return children.start(f"worker {started}", command, logs / f"worker-{started}.log")

    workers = [start_worker(), start_worker()]
    crashes: list[int | None] = []
    deadline = time.monotonic() + TIMEOUT
    wanted = {job.email.to for job in good}
    while True:
        for worker in [w for w in workers if not w.alive()]:  # a supervisor's work
            workers.remove(worker)
            crashes.append(worker.process.returncode)
            workers.append(start_worker())
        dead = [json.loads(line) for p in sorted(tmp_path.glob("dead-letters-*.jsonl"))
                for line in p.read_text().splitlines()]  # fmt: skip
        outcomes = set(recipients(fake)) | {entry["to"] for entry in dead}
        if poison.email.to in outcomes and wanted <= outcomes:
            break
        assert time.monotonic() < deadline, (crashes, dead, sorted(wanted - outcomes))
        time.sleep(0.1)
    for worker in workers:
        # A replacement may still be starting, before its SIGTERM handler is in place.
        assert children.stop(worker, timeout=30) in (0, -signal.SIGTERM), worker.tail()

    # The poison killed a worker on each of its deliveries, then went to the dead letter
    # with its count, before any API call; no other job went there. RabbitMQ 3.x's
    # quorum queues also count a message on its way to a consumer being cancelled (a
    # worker stops reading to send a last chance alone), so there a job may reach the
    # limit with fewer crashes, and a bystander of the poison may be dead-lettered
    # with it: never lost, never sent twice (docs/modes.md).
    counted_returns = broker.kind == "rabbitmq"
    if counted_returns:
        assert 1 <= len(crashes) <= MAX_DELIVERIES and set(crashes) == {CRASH_EXIT_CODE}
    else:
        assert crashes == [CRASH_EXIT_CODE] * MAX_DELIVERIES
    [entry] = [e for e in dead if e["id"] == poison.id]
    bystanders = [e for e in dead if e["id"] != poison.id]
    assert bystanders == [] or counted_returns, bystanders
    assert entry["to"] == poison.email.to
    for each in dead:
        assert f"delivered {MAX_DELIVERIES + 1} times" in each["reason"], each
        assert f"--max-deliveries {MAX_DELIVERIES}" in each["reason"], each
    ledger = recipients(fake)
    assert poison.email.to not in ledger
    assert asyncio.run(queue_counts(broker.url, broker.name)) == (0, len(dead))

    # Total-queue accounting over what was enqueued: nothing lost, nothing unexpected.
    accepted = [(job.email.to, job.enqueued_at) for job in jobs]
    dead_to = [e["to"] for e in dead]
    counts, _ = reconcile(accepted, fake.ledger(), dead_to)
    assert (counts.delivered, counts.dead_lettered, counts.lost, counts.unexpected) == (
        GOOD_JOBS - len(bystanders),
        1 + len(bystanders),
        0,
        0,
    )
    # Negative control: a job accepted but neither delivered nor dead-lettered is lost.
    planted = [*accepted, ("never-enqueued@example.com", time.time())]
    assert reconcile(planted, fake.ledger(), dead_to)[0].lost == 1


async def take(queue: Queue, count: int) -> list[Delivery]:
    deliveries = queue.consume(prefetch=count)
    return [await asyncio.wait_for(anext(deliveries), 10) for _ in range(count)]


def test_a_stopping_worker_hands_back_at_once_what_it_never_started(
    broker: Broker, children: Children, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    fake = start_fake(children, logs, "fixed:3")  # the one call in flight takes 3 s
    jobs = [make_job(f"user{n}@example.com", f"hello {n}") for n in range(5)]
    asyncio.run(enqueue(broker.long_lease_url, broker.name, jobs))
    command = worker_command(
        broker.long_lease_url, broker.name, fake, "--concurrency", "1", "--prefetch", "10"
    )
    worker = children.start("worker", command, logs / "worker.log")
    deadline = time.monotonic() + TIMEOUT
    while fake.stats()["received"] < 1:
        worker.check_alive()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    worker.process.send_signal(signal.SIGTERM)

    async def others() -> list[Delivery]:
        # Another consumer has the four never started at once: not after the 60 s lease,
        # nor after the stopping worker's call in flight has ended.
        queue = await open_queue(broker.long_lease_url, broker.name)
        try:
            got = await take(queue, 4)
            for delivery in got:
                await queue.ack(delivery)
            return got
        finally:
            await queue.close()

    taken = asyncio.run(others())
    assert worker.alive()  # still draining its one call
    assert [(d.deliveries, d.job.attempt) for d in taken] == [(1, 0)] * 4  # uncounted
    assert children.stop(worker, timeout=30) == 0, worker.tail()
    [sent] = recipients(fake)
    assert {d.job.email.to for d in taken} | {sent} == {job.email.to for job in jobs}
    assert asyncio.run(queue_counts(broker.long_lease_url, broker.name)) == (0, 0)


def test_the_drain_waits_a_lease_longer_for_each_worker_replaced(
    children: Children, tmp_path: Path
) -> None:
    """A worker that died during the drain held jobs that come back only after its lease:
    the drain must not give up on them meanwhile."""
    fake = start_fake(children, tmp_path / "logs", "fixed:0")
    raw = tmp_path / "raw"
    raw.mkdir()
    email = Email(to="late@example.com", subject="hello", text="body")
    (raw / LOCUST_FILE).write_text(json.dumps({"sends_ok": [[email.to, time.time()]]}))
    tiers = Tiers(None, "late", raw, "http://127.0.0.1:9", 9, None, "")
    sender = BlockingMailgunClient(MailgunSettings(base_url=fake.url))

    polls = 0

    def supervise() -> int:
        # The first poll replaces a worker; its job reaches the API a poll later.
        nonlocal polls
        polls += 1
        if polls == 2:
            sender.send(email, "late-key")
        return 1 if polls == 1 else 0

    assert drain(tiers, fake, 0.0, 1, supervise, grace_s=30.0)
    # Negative control: without the grace, the same drain gives up at its timeout.
    fake.reset()
    polls = 0
    assert not drain(tiers, fake, 0.0, 1, supervise, grace_s=0.0)
