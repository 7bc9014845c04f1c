"""RabbitMQ's own loss paths, on a real broker: a retry across a broker crash, delivery
counts, settles that fail, and retry delays beyond the wait-queue ladder.

The contract tests (``test_queue_contract.py``) hold for every backend; these test what
only RabbitMQ does: its retries leave the worker's hands and travel inside the broker
(TTL wait queue → dead-lettering → main queue), it counts deliveries per message, and a
delivery left unsettled on a live channel holds a prefetch slot until the channel closes.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import NoReturn

import aio_pika
import pytest

from harness.errors import ConfigError, QueueError, ServiceUnavailable
from harness.services.manager import Services
from harness.services.settings import ServiceSettings
from queues import Delivery, Email, Job, open_queue
from queues.rabbitmq import DELIVERY_LIMIT, RETRY_LADDER_MS
from queues.urls import redact_url

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

TIMEOUT = 10.0  # generous: a delivery that takes this long has failed


def make_job(n: int = 0) -> Job:
    return Job(id=uuid.uuid4().hex, email=Email(to=f"user{n}@example.com", subject="s", text="t"))


async def next_delivery(deliveries: AsyncIterator[Delivery], timeout: float = TIMEOUT) -> Delivery:
    return await asyncio.wait_for(anext(deliveries), timeout)


async def delete_queues(url: str, name: str) -> None:
    names = [name, f"{name}.dead", *(f"{name}.retry.{ms}ms" for ms in RETRY_LADDER_MS)]
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        for queue in names:
            await channel.queue_delete(queue)


@pytest.fixture
async def queue_name(rabbitmq_url: str) -> AsyncIterator[str]:
    name = f"loss-{uuid.uuid4().hex[:12]}"
    yield name
    await delete_queues(rabbitmq_url, name)  # the broker may be the user's own (AMQP_URL)


async def test_deliveries_counts_every_handout_of_a_message(
    rabbitmq_url: str, queue_name: str
) -> None:
    producer = await open_queue(rabbitmq_url, queue_name)
    job = make_job()
    await producer.enqueue(job)
    await producer.close()
    for handout in (1, 2, 3, 4):
        # Delivered, never settled, the consumer's channel closed: the broker hands the
        # message out again, and counts it.
        consumer = await open_queue(rabbitmq_url, queue_name)
        delivery = await next_delivery(consumer.consume(prefetch=1))
        assert (delivery.job, delivery.deliveries) == (job, handout)
        await consumer.close()
    consumer = await open_queue(rabbitmq_url, queue_name)
    delivery = await next_delivery(consumer.consume(prefetch=1))
    assert delivery.deliveries == 5
    await consumer.ack(delivery)
    assert await consumer.depth() == 0
    await consumer.close()


async def test_a_hand_back_is_not_counted_and_carries_the_count_so_far(
    rabbitmq_url: str, queue_name: str
) -> None:
    """A nack would count as one more delivery; a hand-back (a job the worker never
    started) must not, yet must not forget the deliveries before it either."""
    job = make_job()
    crashed = await open_queue(rabbitmq_url, queue_name)
    await crashed.enqueue(job)
    await next_delivery(crashed.consume(prefetch=1))
    await crashed.close()  # unsettled: counted
    holder = await open_queue(rabbitmq_url, queue_name)
    delivery = await next_delivery(holder.consume(prefetch=1))
    assert delivery.deliveries == 2
    await holder.hand_back(delivery)  # not counted
    assert await holder.depth() == 1
    await holder.close()
    for handout in (2, 3):
        consumer = await open_queue(rabbitmq_url, queue_name)
        delivery = await next_delivery(consumer.consume(prefetch=1))
        assert (delivery.job, delivery.deliveries) == (job, handout)
        await consumer.close()  # unsettled again: counted on top of what was carried


async def test_a_retry_is_a_new_message_delivered_for_the_first_time(
    rabbitmq_url: str, queue_name: str
) -> None:
    queue = await open_queue(rabbitmq_url, queue_name)
    try:
        await queue.enqueue(make_job())
        deliveries = queue.consume(prefetch=1)
        await queue.retry(await next_delivery(deliveries), 0.01)
        again = await next_delivery(deliveries)
        assert (again.job.attempt, again.deliveries) == (1, 1)
        await queue.ack(again)
    finally:
        await queue.close()


async def test_a_dead_letter_that_fails_hands_the_message_back_at_once(
    rabbitmq_url: str, queue_name: str
) -> None:
    queue = await open_queue(rabbitmq_url, queue_name)
    try:
        job = make_job()
        await queue.enqueue(job)
        deliveries = queue.consume(prefetch=1)
        delivery = await next_delivery(deliveries)
        # The dead-letter queue is gone: the publish is returned as unroutable.
        async with await aio_pika.connect(rabbitmq_url) as admin:
            await (await admin.channel()).queue_delete(f"{queue_name}.dead")
        with pytest.raises(QueueError, match="dead-letter"):
            await queue.dead_letter(delivery, "'to' is not a valid address")
        # Left unacknowledged on the live channel it would hold the one prefetch slot
        # until the channel closed; handed back, it comes again (and is counted again).
        again = await next_delivery(deliveries)
        assert (again.job, again.deliveries) == (job, 2)
        await queue.ack(again)
        assert await queue.depth() == 0
    finally:
        await queue.close()


async def test_a_delay_beyond_the_ladder_waits_on_its_top_rung(
    rabbitmq_url: str, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    queue = await open_queue(rabbitmq_url, queue_name)
    try:
        await queue.enqueue(make_job())
        deliveries = queue.consume(prefetch=1)
        with caplog.at_level(logging.WARNING, logger="queues.rabbitmq"):
            await queue.retry(await next_delivery(deliveries), 86_400.0)  # a day
        top = RETRY_LADDER_MS[-1]
        assert f"{top / 1000:g} s" in caplog.text
        # Scheduled, and the original settled: nothing waits ready or unacknowledged.
        counts = await wait_queue_counts(rabbitmq_url, queue_name)
        assert counts == {f"{queue_name}.retry.{top}ms": 1, queue_name: 0}
    finally:
        await queue.close()


async def wait_queue_counts(url: str, name: str) -> dict[str, int]:
    """Ready messages per non-empty wait queue, and of the main queue."""
    counts = {}
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        for ms in RETRY_LADDER_MS:
            wait = await channel.declare_queue(f"{name}.retry.{ms}ms", passive=True)
            if wait.declaration_result.message_count:
                counts[wait.name] = wait.declaration_result.message_count
        main = await channel.declare_queue(name, passive=True)
        counts[name] = main.declaration_result.message_count or 0
    return counts


@pytest.fixture(scope="module")
def own_broker(
    make_service_settings: Callable[[], ServiceSettings],
    service_unavailable: Callable[[str], NoReturn],
) -> Iterator[tuple[Services, str]]:
    """A RabbitMQ of these tests' own (they crash it and delete its queues) whose
    dead-letter worker retries a transfer its target did not confirm after 1 s instead
    of 180 s, so that retry is seen within a test."""
    settings = make_service_settings()
    with Services(settings) as services:
        try:
            services.start("rabbitmq")
            advanced = settings.base_dir / "rabbitmq" / "advanced.config"
            advanced.write_text(
                "[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, 1000}]}].\n"
            )
            url = services.restart("rabbitmq", crash=False)
        except ServiceUnavailable as exc:
            service_unavailable(str(exc))
        yield services, url


@pytest.mark.timeout(120)
async def test_a_retry_whose_queue_is_gone_when_its_delay_ends_waits_for_it(
    own_broker: tuple[Services, str],
) -> None:
    """The hop back from the wait queue is the broker's own dead-lettering. When its
    target cannot take the message (here: the queue was deleted; after a crash: not yet
    recovered), at-most-once dead-lettering drops it; at-least-once keeps it."""
    _, url = own_broker
    name = f"gone-{uuid.uuid4().hex[:12]}"
    queue = await open_queue(url, name)
    job = make_job()
    await queue.enqueue(job)
    await queue.retry(await next_delivery(queue.consume(prefetch=1)), 0.5)
    await queue.close()
    async with await aio_pika.connect(url) as admin:
        await (await admin.channel()).queue_delete(name)
    await asyncio.sleep(1.5)  # the delay ends with no queue to go back to

    survivor = await open_queue(url, name)  # the queue is there again
    try:
        delivery = await next_delivery(survivor.consume(prefetch=1), timeout=30)
        assert (delivery.job.id, delivery.job.attempt) == (job.id, 1)
        await survivor.ack(delivery)
    finally:
        await survivor.close()
        await delete_queues(url, name)


@pytest.mark.timeout(180)  # RabbitMQ boots again, ~10-15 s on a busy 2-core machine
async def test_a_retry_survives_a_broker_crash_after_the_ack_of_its_original(
    own_broker: tuple[Services, str],
) -> None:
    """The worst moment for a retry: its original is acknowledged, so only the broker
    holds it, in a wait queue, until its TTL moves it back into the main queue. The
    broker is killed then, and the TTL runs out while it is down, so the move happens
    while the broker recovers its queues."""
    services, url = own_broker
    name = f"crash-{uuid.uuid4().hex[:12]}"
    queue = await open_queue(url, name)
    jobs = [make_job(n) for n in range(20)]
    for job in jobs:
        await queue.enqueue(job)
    deliveries = queue.consume(prefetch=len(jobs))
    for _ in jobs:
        await queue.retry(await next_delivery(deliveries), 1.0)
    assert await queue.depth() == len(jobs)  # all twenty wait out their delay
    # Closed first: its close-ok follows the acks, so the broker has taken them all.
    await queue.close()
    await asyncio.to_thread(services.restart, "rabbitmq")  # SIGKILL, then start again

    survivor = await open_queue(url, name)
    try:
        again = survivor.consume(prefetch=len(jobs))
        retried: set[str] = set()
        while len(retried) < len(jobs):
            delivery = await next_delivery(again, timeout=60)
            # An original whose ack the crash undid may come back too: a duplicate,
            # which at-least-once allows. Its retry must come back in any case.
            if delivery.job.attempt == 1:
                retried.add(delivery.job.id)
            await survivor.ack(delivery)
        assert retried == {job.id for job in jobs}
    finally:
        await survivor.close()
        await delete_queues(url, name)


async def test_a_queue_declared_otherwise_is_one_clear_sentence(
    rabbitmq_url: str, queue_name: str
) -> None:
    async with await aio_pika.connect(rabbitmq_url) as admin:
        await (await admin.channel()).declare_queue(queue_name, durable=True)  # classic
    with pytest.raises(ConfigError) as caught:
        await open_queue(rabbitmq_url, queue_name)
    message = str(caught.value)
    assert message.startswith(f"RabbitMQ at {redact_url(rabbitmq_url)} refused queue")
    assert "inequivalent arg" in message and "must be deleted first" in message


async def test_beyond_the_brokers_delivery_limit_a_job_is_dead_lettered_not_dropped(
    rabbitmq_url: str, queue_name: str
) -> None:
    """A backstop far above the worker's own limit, for consumers that never settle
    (RabbitMQ 4 has one of 20 by default, and drops what exceeds it unless the queue
    dead-letters)."""
    queue = await open_queue(rabbitmq_url, queue_name)
    try:
        await queue.enqueue(make_job())
        handouts = 0
        async with await aio_pika.connect(rabbitmq_url) as connection:
            while handouts <= DELIVERY_LIMIT + 1:
                channel = await connection.channel()
                main = await channel.get_queue(queue_name, ensure=False)
                message = await main.get(no_ack=False, fail=False)
                await channel.close()  # unsettled: returned, and counted
                if message is None:
                    break
                handouts += 1
        assert handouts == DELIVERY_LIMIT + 1
        assert (await queue.depth(), await queue.dead_letters()) == (0, 1)
        async with await aio_pika.connect(rabbitmq_url) as connection:
            dead = await (await connection.channel()).get_queue(f"{queue_name}.dead")
            message = await dead.get(no_ack=False)
            assert message.headers["x-first-death-reason"] == "delivery_limit"
    finally:
        await queue.close()
