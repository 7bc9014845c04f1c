"""What the in-memory backend offers beyond the shared contract (tested in
``tests/integration/test_queue_contract.py``): shared stores, crash simulation and
inspection of dead letters, on which the worker and server tests rely."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from harness.errors import QueueError
from queues import Delivery, Email, Job, open_queue
from queues.memory import MemoryQueue, open_memory, reset_memory

pytestmark = pytest.mark.timeout(10)


def make_job(n: int = 0) -> Job:
    return Job(id=uuid.uuid4().hex, email=Email(f"u{n}@example.com", f"s{n}", "t"))


@pytest.fixture
def url() -> str:
    return f"memory://{uuid.uuid4().hex}"


async def take(deliveries: AsyncIterator[Delivery]) -> Delivery:
    return await asyncio.wait_for(anext(deliveries), 2)


async def test_registry_opens_memory_queues(url: str) -> None:
    assert isinstance(await open_queue(url, "jobs"), MemoryQueue)
    assert isinstance(await open_queue("memory://", "jobs"), MemoryQueue)


async def test_same_space_and_name_share_jobs_others_do_not(url: str) -> None:
    server, worker = await open_memory(url, "jobs"), await open_memory(url, "jobs")
    other_name = await open_memory(url, "other")
    other_space = await open_memory(f"memory://{uuid.uuid4().hex}", "jobs")
    job = make_job()
    await server.enqueue(job)
    assert (await take(worker.consume(1))).job == job
    assert await server.depth() == 1  # in flight on the worker
    assert await other_name.depth() == 0 and await other_space.depth() == 0


async def test_requeue_unacked_simulates_a_consumer_crash(url: str) -> None:
    crashed, survivor = await open_memory(url, "jobs"), await open_memory(url, "jobs")
    jobs = [make_job(n) for n in range(3)]
    for job in jobs:
        await crashed.enqueue(job)
    deliveries = crashed.consume(3)
    held = [await take(deliveries) for _ in jobs]
    assert crashed.requeue_unacked() == 3
    assert crashed.requeue_unacked() == 0
    again = survivor.consume(3)
    assert {(await take(again)).job for _ in jobs} == set(jobs)
    with pytest.raises(QueueError, match="not in flight"):
        await crashed.ack(held[0])  # gone back to the queue: no longer the crashed one's


async def test_close_requeues_unacked_and_ends_consume(url: str) -> None:
    queue, survivor = await open_memory(url, "jobs"), await open_memory(url, "jobs")
    job = make_job()
    await queue.enqueue(job)
    deliveries = queue.consume(1)
    await take(deliveries)
    rest = asyncio.ensure_future(anext(deliveries))
    await asyncio.sleep(0.01)
    await queue.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(rest, 1)
    assert (await take(survivor.consume(1))).job == job
    with pytest.raises(QueueError, match="closed"):
        await queue.enqueue(make_job())


async def test_settling_twice_is_an_error(url: str) -> None:
    queue = await open_memory(url, "jobs")
    await queue.enqueue(make_job())
    delivery = await take(queue.consume(1))
    await queue.ack(delivery)
    with pytest.raises(QueueError):
        await queue.retry(delivery, 0)
    assert await queue.depth() == 0


async def test_dead_lettered_keeps_job_reason_and_poison_payloads(url: str) -> None:
    queue = await open_memory(url, "jobs")
    job = make_job()
    queue.put_raw(b"garbage")
    await queue.enqueue(job)
    delivery = await take(queue.consume(1))
    await queue.dead_letter(delivery, "'to' is not a valid address")
    poison, dead = queue.dead_lettered()
    assert (poison.payload, poison.job) == (b"garbage", None)
    assert poison.reason.startswith("not a mailbench job")
    assert (dead.job, dead.reason) == (job, "'to' is not a valid address")
    assert await queue.dead_letters() == 2 and await queue.depth() == 0


async def test_retries_come_back_by_due_time_with_the_next_attempt(url: str) -> None:
    queue = await open_memory(url, "jobs")
    late, soon = make_job(1), make_job(2)
    await queue.enqueue(late)
    await queue.enqueue(soon)
    deliveries = queue.consume(2)
    first, second = await take(deliveries), await take(deliveries)
    await queue.retry(first, 0.2)
    await queue.retry(second, 0.05)
    assert await queue.depth() == 2
    order = [(await take(deliveries)).job for _ in range(2)]
    assert order == [soon.next_attempt(), late.next_attempt()]


async def test_prefetch_must_be_positive(url: str) -> None:
    queue = await open_memory(url, "jobs")
    with pytest.raises(ValueError):
        await anext(queue.consume(0))


async def test_reset_memory_forgets_every_queue(url: str) -> None:
    await (await open_memory(url, "jobs")).enqueue(make_job())
    reset_memory()
    assert await (await open_memory(url, "jobs")).depth() == 0
