"""Enqueue per backend: what a queued POST /send pays beyond the form page.

memory and SQLite always run; Redis, RabbitMQ and PostgreSQL come from the session's
brokers (tests/conftest.py) and are skipped when one cannot be had (failed under CI).
Each test enqueues into a queue of its own and removes it from the broker afterwards.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from queues import Email, Job, Queue, open_queue

EMAIL = Email(to="reader@example.com", subject="Benchmark message", text="Hello " * 40)


async def _redis_clean(url: str, name: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    await client.delete(*(f"mailbench:{{{name}}}:{key}" for key in ("jobs", "delayed", "dead")))
    await client.aclose()


async def _rabbitmq_clean(url: str, name: str) -> None:
    import aio_pika

    from queues.rabbitmq import RETRY_LADDER_MS

    names = [name, f"{name}.dead", *(f"{name}.retry.{ms}ms" for ms in RETRY_LADDER_MS)]
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        for queue_name in names:
            await channel.queue_delete(queue_name)


async def _postgres_clean(url: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    await conn.execute("DELETE FROM mailbench_jobs WHERE queue = $1", name)
    await conn.close()


async def _nothing(url: str, name: str) -> None:
    return None


CLEAN: dict[str, Callable[[str, str], Awaitable[None]]] = {
    "memory": _nothing,
    "sqlite": _nothing,  # the file is in tmp_path
    "redis": _redis_clean,
    "rabbitmq": _rabbitmq_clean,
    "postgres": _postgres_clean,
}


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        pytest.param("redis", marks=pytest.mark.integration),
        pytest.param("rabbitmq", marks=pytest.mark.integration),
        pytest.param("postgres", marks=pytest.mark.integration),
    ]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(kind, URL) of one backend."""
    kind: str = request.param
    if kind == "memory":
        return kind, f"memory://{uuid.uuid4().hex}"
    if kind == "sqlite":
        return kind, f"sqlite:///{tmp_path / 'jobs.db'}"
    return kind, str(request.getfixturevalue(f"{kind}_url"))


@pytest.fixture
def opened(backend: tuple[str, str]) -> Iterator[tuple[asyncio.AbstractEventLoop, Queue]]:
    kind, url = backend
    name = f"microbench-{uuid.uuid4().hex[:12]}"
    loop = asyncio.new_event_loop()
    queue = loop.run_until_complete(open_queue(url, name))
    try:
        yield loop, queue
    finally:
        loop.run_until_complete(queue.close())
        loop.run_until_complete(CLEAN[kind](url.partition("?")[0], name))
        loop.close()


def test_enqueue(
    benchmark: BenchmarkFixture, opened: tuple[asyncio.AbstractEventLoop, Queue]
) -> None:
    """One durable enqueue (confirm, reply or commit), as POST /send awaits it."""
    loop, queue = opened

    def enqueue() -> None:
        loop.run_until_complete(queue.enqueue(Job(id=uuid.uuid4().hex, email=EMAIL)))

    benchmark(enqueue)
    assert loop.run_until_complete(queue.depth()) >= 1
