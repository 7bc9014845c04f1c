"""Queue depth as the harness samples it, over its own connection to the broker."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from harness.run.depth import DepthSampler, open_probe
from harness.services.manager import Services
from queues import Email, Job, open_queue

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def make_job(n: int) -> Job:
    return Job(id=uuid.uuid4().hex, email=Email(to=f"user{n}@example.com", subject="s", text="t"))


async def test_rabbitmq_depth_counts_jobs_held_unacknowledged(
    rabbitmq_url: str, services: Services
) -> None:
    if services.status()["rabbitmq"].state != "running":
        pytest.skip("needs a RabbitMQ mailbench started (not one from AMQP_URL)")
    name = f"depth-{uuid.uuid4().hex[:12]}"
    queue = await open_queue(rabbitmq_url, name)
    consumer = await open_queue(rabbitmq_url, name)
    probe = await open_probe(rabbitmq_url, name, services.settings)
    try:
        for n in range(5):
            await queue.enqueue(make_job(n))
        deliveries = consumer.consume(2)
        held = [await asyncio.wait_for(anext(deliveries), 10) for _ in range(2)]
        assert len(held) == 2  # a worker holds two, unacknowledged
        # Three wait ready, two are in a worker's hands: all five are still to be sent.
        assert await probe.depth() == 5
        for delivery in held:
            await consumer.ack(delivery)
        # An ack has no reply; the quorum queue applies it through its Raft log, where the
        # probe reads: the count follows within moments.
        deadline = time.monotonic() + 10
        while (depth := await probe.depth()) != 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert depth == 3
    finally:
        await probe.close()
        await consumer.close()
        await queue.close()


def test_the_sampler_counts_once_a_second_in_its_own_thread(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"

    async def seed() -> None:
        queue = await open_queue(url, "sampled")
        for n in range(3):
            await queue.enqueue(make_job(n))
        await queue.close()

    asyncio.run(seed())
    started = time.time()
    with DepthSampler(url, "sampled", None) as sampler:
        deadline = time.monotonic() + 30
        while len(sampler.samples) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    values = list(sampler.samples.values())
    assert len(values) >= 2 and set(values) == {3}
    # Keyed by when each was taken, so the timeline can place them.
    assert all(started <= float(at) <= time.time() for at in sampler.samples)
