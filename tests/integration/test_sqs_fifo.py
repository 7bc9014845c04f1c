"""The SQS backend on a FIFO queue (a name ending in ``.fifo``), against moto: the job's
id deduplicates its enqueue, and a retry waits out its delay although a FIFO queue takes
no per-message delay."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from queues import Email, Job, open_queue
from queues.sqs import SQSQueue

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TIMEOUT = 10.0


def make_job() -> Job:
    return Job(id=uuid.uuid4().hex, email=Email(to="fifo@example.com", subject="hi", text="x"))


@pytest.fixture
async def fifo(sqs_url: str) -> AsyncIterator[SQSQueue]:
    queue = await open_queue(f"{sqs_url}&visibility=5", f"fifo-{uuid.uuid4().hex[:12]}.fifo")
    assert isinstance(queue, SQSQueue)
    yield queue
    await queue.close()


async def test_an_enqueue_sent_twice_is_one_message(fifo: SQSQueue) -> None:
    job = make_job()
    await fifo.enqueue(job)
    await fifo.enqueue(job)  # as a server's retried SendMessage would
    assert await fifo.depth() == 1
    # Negative control: another job is another message.
    await fifo.enqueue(make_job())
    assert await fifo.depth() == 2


async def test_a_retry_waits_out_its_delay_and_counts_from_one(fifo: SQSQueue) -> None:
    job = make_job()
    await fifo.enqueue(job)
    deliveries = fifo.consume(prefetch=1)
    first = await asyncio.wait_for(anext(deliveries), TIMEOUT)
    delay = 1.5
    retried_at = time.monotonic()
    await fifo.retry(first, delay)
    assert await fifo.depth() == 1
    again = await asyncio.wait_for(anext(deliveries), TIMEOUT)
    assert time.monotonic() - retried_at >= delay - 0.02
    assert (again.job.id, again.job.attempt, again.deliveries) == (job.id, 1, 1)
    await fifo.dead_letter(again, "'to' is not a valid address")
    assert (await fifo.depth(), await fifo.dead_letters()) == (0, 1)
