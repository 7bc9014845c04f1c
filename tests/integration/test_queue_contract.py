"""The queue contract of :mod:`queues.base`: one set of test bodies, every backend.

Leases and visibility timeouts are shortened through the URL (``lease=1``,
``visibility=1``), so redelivery after a consumer dies takes about a second. Raw
payloads are injected with each backend's own driver to check poison handling.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

from harness.errors import ConfigError, QueueError, ServiceUnavailable
from harness.services.manager import Services
from harness.services.settings import ServiceSettings
from queues import Delivery, Email, Job, Queue, encode_job, open_queue
from servers.modes import MODES

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 10.0  # generous: a delivery that takes this long has failed
# moto, the local SQS server, is Python serving every call (~25 settled jobs/s for two
# consumers that settle one at a time, on a busy 2-core machine): more time to drain.
SLOWER = {"sqs": 4}


def make_job(n: int = 0) -> Job:
    email = Email(to=f"user{n}@example.com", subject=f"hello {n}", text="body ✓")
    return Job(id=uuid.uuid4().hex, email=email)


async def next_delivery(deliveries: AsyncIterator[Delivery]) -> Delivery:
    return await asyncio.wait_for(anext(deliveries), TIMEOUT)


def with_query(url: str, query: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{query}"


def with_long_lease(kind: str, url: str) -> str:
    """The URL with redelivery after a lease expiry pushed out of a test's reach (the
    parameter is the one the mode registry names; the in-memory backend is no mode)."""
    mode = MODES.get(kind)
    if mode is None or mode.lease_parameter is None:
        return url
    return with_query(url, f"{mode.lease_parameter}=60")


@dataclass
class Backend:
    """A fresh queue name on one backend, plus raw access through its driver."""

    kind: str
    url: str
    name: str = field(default_factory=lambda: f"contract-{uuid.uuid4().hex[:12]}")
    opened: list[Queue] = field(default_factory=list)

    async def open(self, *, long_lease: bool = False) -> Queue:
        """``long_lease``: redelivery after a lease expiry cannot happen during a test."""
        url = with_long_lease(self.kind, self.url) if long_lease else self.url
        queue = await open_queue(url, self.name)
        self.opened.append(queue)
        return queue

    async def inject(self, raw: bytes) -> None:
        await INJECT[self.kind](self, raw)

    async def dead_reasons(self) -> list[str]:
        return await REASONS[self.kind](self)


async def _memory_inject(backend: Backend, raw: bytes) -> None:
    (await backend.open()).put_raw(raw)  # type: ignore[attr-defined]


async def _memory_reasons(backend: Backend) -> list[str]:
    queue: Any = await backend.open()
    return [dead.reason for dead in queue.dead_lettered()]


def _sqlite_file(backend: Backend) -> str:
    return backend.url.removeprefix("sqlite:///").partition("?")[0]


async def _sqlite_inject(backend: Backend, raw: bytes) -> None:
    with sqlite3.connect(_sqlite_file(backend)) as conn:
        conn.execute(
            "INSERT INTO mailbench_jobs (queue, payload, run_at) VALUES (?, ?, 0)",
            (backend.name, raw),
        )


async def _sqlite_reasons(backend: Backend) -> list[str]:
    with sqlite3.connect(_sqlite_file(backend)) as conn:
        sql = "SELECT reason FROM mailbench_jobs WHERE queue = ? AND state = 'dead' ORDER BY id"
        return [reason for (reason,) in conn.execute(sql, (backend.name,))]


async def _redis_inject(backend: Backend, raw: bytes) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(backend.url.partition("?")[0])
    await client.xadd(f"mailbench:{{{backend.name}}}:jobs", {"job": raw})
    await client.aclose()


async def _redis_reasons(backend: Backend) -> list[str]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(backend.url.partition("?")[0])
    entries: Any = await client.xrange(f"mailbench:{{{backend.name}}}:dead")
    await client.aclose()
    return [fields[b"reason"].decode() for _, fields in entries]


async def _rabbitmq_inject(backend: Backend, raw: bytes) -> None:
    import aio_pika

    async with await aio_pika.connect(backend.url) as connection:
        channel = await connection.channel()
        await channel.default_exchange.publish(aio_pika.Message(raw), routing_key=backend.name)


async def _rabbitmq_reasons(backend: Backend) -> list[str]:
    import aio_pika

    reasons = []
    async with await aio_pika.connect(backend.url) as connection:
        channel = await connection.channel()
        dead = await channel.declare_queue(f"{backend.name}.dead", passive=True)
        # Unacked gets: closing the connection puts the dead letters back.
        while (message := await dead.get(no_ack=False, fail=False)) is not None:
            reasons.append(str(message.headers["x-mailbench-reason"]))
    return reasons


async def _postgres_inject(backend: Backend, raw: bytes) -> None:
    import asyncpg

    conn = await asyncpg.connect(backend.url.partition("?")[0])
    sql = "INSERT INTO mailbench_jobs (queue, payload) VALUES ($1, $2)"
    await conn.execute(sql, backend.name, raw)
    await conn.close()


async def _postgres_reasons(backend: Backend) -> list[str]:
    import asyncpg

    conn = await asyncpg.connect(backend.url.partition("?")[0])
    sql = "SELECT reason FROM mailbench_jobs WHERE queue = $1 AND state = 'dead' ORDER BY id"
    rows = await conn.fetch(sql, backend.name)
    await conn.close()
    return [row[0] for row in rows]


def _sqs_client(backend: Backend) -> Any:
    from aiobotocore.session import get_session

    from queues.sqs import parse_url

    target, _ = parse_url(backend.url)
    assert target.key is not None
    key, secret = target.key
    return get_session().create_client(
        "sqs",
        region_name=target.region,
        endpoint_url=target.endpoint,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
    )


async def _sqs_inject(backend: Backend, raw: bytes) -> None:
    async with _sqs_client(backend) as client:
        url = (await client.get_queue_url(QueueName=backend.name))["QueueUrl"]
        # An SQS body is text: the undecodable byte arrives as U+FFFD, still no job.
        await client.send_message(QueueUrl=url, MessageBody=raw.decode(errors="replace"))


async def _sqs_reasons(backend: Backend) -> list[str]:
    reasons = []
    async with _sqs_client(backend) as client:
        url = (await client.get_queue_url(QueueName=f"{backend.name}-dead"))["QueueUrl"]
        while True:  # received and left: they come back after the visibility timeout
            reply = await client.receive_message(
                QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=30,
                MessageAttributeNames=["All"],
            )  # fmt: skip
            if not reply.get("Messages"):
                return reasons
            for message in reply["Messages"]:
                reasons.append(message["MessageAttributes"]["mailbench-reason"]["StringValue"])


async def _sqs_clean(backend: Backend) -> None:
    async with _sqs_client(backend) as client:
        for name in (backend.name, f"{backend.name}-dead"):
            url = (await client.get_queue_url(QueueName=name))["QueueUrl"]
            await client.delete_queue(QueueUrl=url)


async def _nothing_to_clean(backend: Backend) -> None:
    return None


async def _redis_clean(backend: Backend) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(backend.url.partition("?")[0])
    await client.delete(*(f"mailbench:{{{backend.name}}}:{key}" for key in KEYS))
    await client.aclose()


async def _rabbitmq_clean(backend: Backend) -> None:
    import aio_pika

    from queues.rabbitmq import RETRY_LADDER_MS

    names = [backend.name, f"{backend.name}.dead"]
    names += [f"{backend.name}.retry.{ms}ms" for ms in RETRY_LADDER_MS]
    async with await aio_pika.connect(backend.url) as connection:
        channel = await connection.channel()
        for name in names:
            await channel.queue_delete(name)


async def _postgres_clean(backend: Backend) -> None:
    import asyncpg

    conn = await asyncpg.connect(backend.url.partition("?")[0])
    await conn.execute("DELETE FROM mailbench_jobs WHERE queue = $1", backend.name)
    await conn.close()


KEYS = ("jobs", "delayed", "dead")
CLEAN: dict[str, Callable[[Backend], Awaitable[None]]] = {
    "memory": _nothing_to_clean,
    "sqlite": _nothing_to_clean,  # the file is in tmp_path
    "redis": _redis_clean,
    "rabbitmq": _rabbitmq_clean,
    "postgres": _postgres_clean,
    "sqs": _sqs_clean,
}
INJECT: dict[str, Callable[[Backend, bytes], Awaitable[None]]] = {
    "memory": _memory_inject,
    "sqlite": _sqlite_inject,
    "redis": _redis_inject,
    "rabbitmq": _rabbitmq_inject,
    "postgres": _postgres_inject,
    "sqs": _sqs_inject,
}
REASONS: dict[str, Callable[[Backend], Awaitable[list[str]]]] = {
    "memory": _memory_reasons,
    "sqlite": _sqlite_reasons,
    "redis": _redis_reasons,
    "rabbitmq": _rabbitmq_reasons,
    "postgres": _postgres_reasons,
    "sqs": _sqs_reasons,
}


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        pytest.param("redis", marks=pytest.mark.integration),
        pytest.param("rabbitmq", marks=pytest.mark.integration),
        pytest.param("postgres", marks=pytest.mark.integration),
        pytest.param("sqs", marks=pytest.mark.integration),
    ]
)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    kind: str = request.param
    if kind == "memory":
        url = f"memory://{uuid.uuid4().hex}"
    elif kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.db'}?lease=1&poll=0.01"
    elif kind == "redis":
        url = with_query(request.getfixturevalue("redis_url"), "visibility=1&poll=0.1")
    elif kind == "rabbitmq":
        url = request.getfixturevalue("rabbitmq_url")
    elif kind == "sqs":
        url = with_query(request.getfixturevalue("sqs_url"), "visibility=1&poll=1")
    else:
        url = with_query(request.getfixturevalue("postgres_url"), "lease=1&poll=0.1")
    backend = Backend(kind, url)
    yield backend
    for queue in backend.opened:
        await queue.close()
    await CLEAN[kind](backend)  # the brokers may be the user's own (AMQP_URL, ...)


async def test_enqueue_consume_ack_drains(backend: Backend) -> None:
    queue = await backend.open()
    job = make_job()
    await queue.enqueue(job)
    deliveries = queue.consume(prefetch=1)
    delivery = await next_delivery(deliveries)
    assert delivery.job == job
    assert delivery.received_at >= job.enqueued_at
    await queue.ack(delivery)
    assert await queue.depth() == 0
    assert await queue.dead_letters() == 0


async def test_depth_counts_waiting_and_in_flight(backend: Backend) -> None:
    queue = await backend.open()
    for n in range(3):
        await queue.enqueue(make_job(n))
    assert await queue.depth() == 3
    deliveries = queue.consume(prefetch=1)
    first = await next_delivery(deliveries)
    assert await queue.depth() == 3  # one in flight, two waiting
    await queue.ack(first)
    assert await queue.depth() == 2


async def test_unsettled_delivery_is_redelivered_after_its_consumer_dies(
    backend: Backend,
) -> None:
    crashed = await backend.open()
    job = make_job()
    await crashed.enqueue(job)
    lost = await next_delivery(crashed.consume(prefetch=1))
    await crashed.close()  # without settling: the consumer "dies"

    survivor = await backend.open()
    again = await next_delivery(survivor.consume(prefetch=1))
    assert again.job == lost.job == job  # same id and attempt: it was never retried
    await survivor.ack(again)
    assert await survivor.depth() == 0


async def test_a_redelivery_after_its_consumer_dies_counts_one_more_delivery(
    backend: Backend,
) -> None:
    crashed = await backend.open()
    job = make_job()
    await crashed.enqueue(job)
    first = await next_delivery(crashed.consume(prefetch=1))
    assert first.deliveries == 1
    await crashed.close()  # without settling: the consumer "dies"

    survivor = await backend.open()
    deliveries = survivor.consume(prefetch=1)
    again = await next_delivery(deliveries)
    assert (again.job, again.deliveries) == (job, 2)  # a delivery, not an attempt
    await survivor.retry(again, 0)
    retried = await next_delivery(deliveries)
    # A retry is a new attempt: its deliveries are counted from 1 again.
    assert (retried.job.attempt, retried.deliveries) == (1, 1)
    await survivor.ack(retried)
    assert await survivor.depth() == 0


async def test_hand_back_returns_a_delivery_at_once_without_counting_it(
    backend: Backend,
) -> None:
    holder = await backend.open(long_lease=True)
    job = make_job()
    await holder.enqueue(job)
    delivery = await next_delivery(holder.consume(prefetch=1))
    await holder.hand_back(delivery)
    assert await holder.depth() == 1  # waiting again, not gone

    # Another consumer has it at once, not after the lease (60 s here), uncounted.
    other = await backend.open(long_lease=True)
    again = await next_delivery(other.consume(prefetch=1))
    assert (again.job, again.deliveries) == (job, 1)
    await other.ack(again)
    assert await other.depth() == 0


async def test_hand_back_keeps_the_count_of_a_redelivery(backend: Backend) -> None:
    crashed = await backend.open()
    job = make_job()
    await crashed.enqueue(job)
    await next_delivery(crashed.consume(prefetch=1))
    await crashed.close()  # without settling: the consumer "dies"

    holder = await backend.open()
    redelivered = await next_delivery(holder.consume(prefetch=1))
    assert redelivered.deliveries == 2
    await holder.hand_back(redelivered)
    other = await backend.open()
    again = await next_delivery(other.consume(prefetch=1))
    assert (again.job, again.deliveries) == (job, 2)  # neither 1 (forgotten) nor 3
    await other.ack(again)


@pytest.mark.parametrize("stop", ["stop-iterating", "close-queue"])
async def test_jobs_read_ahead_but_never_handed_out_return_at_once(
    backend: Backend, stop: str
) -> None:
    queue = await backend.open(long_lease=True)
    jobs = [make_job(n) for n in range(3)]
    for job in jobs:
        await queue.enqueue(job)
    deliveries = queue.consume(prefetch=3)  # may fetch all three in one go
    first = await next_delivery(deliveries)
    await queue.ack(first)
    if stop == "close-queue":
        await queue.close()
    else:
        await deliveries.aclose()  # type: ignore[attr-defined]

    survivor = await backend.open(long_lease=True)
    again = survivor.consume(prefetch=3)
    rest = {(await next_delivery(again)).job for _ in range(2)}
    assert rest == set(jobs) - {first.job}


async def test_retry_is_invisible_until_its_delay_then_has_the_next_attempt(
    backend: Backend,
) -> None:
    queue = await backend.open()
    job = make_job()
    await queue.enqueue(job)
    deliveries = queue.consume(prefetch=1)
    delay = 0.5
    retried_at = time.monotonic()
    await queue.retry(await next_delivery(deliveries), delay)
    assert await queue.depth() == 1  # a waiting retry still counts
    again = await next_delivery(deliveries)
    assert time.monotonic() - retried_at >= delay - 0.02
    assert again.job.id == job.id
    assert again.job.attempt == job.attempt + 1
    assert again.job.enqueued_at == job.enqueued_at
    await queue.ack(again)
    assert await queue.depth() == 0


async def test_dead_letter_keeps_the_reason_and_is_never_delivered_again(
    backend: Backend,
) -> None:
    queue = await backend.open()
    doomed, marker = make_job(1), make_job(2)
    await queue.enqueue(doomed)
    deliveries = queue.consume(prefetch=1)
    await queue.dead_letter(await next_delivery(deliveries), "'to' is not a valid address")
    assert await queue.dead_letters() == 1
    assert await queue.depth() == 0
    await asyncio.sleep(1.3)  # past every lease and visibility timeout used here
    await queue.enqueue(marker)
    delivery = await next_delivery(deliveries)
    assert delivery.job.id == marker.id
    await queue.ack(delivery)
    assert await backend.dead_reasons() == ["'to' is not a valid address"]
    assert await queue.depth() == 0


async def test_poison_payload_is_dead_lettered_and_does_not_block(backend: Backend) -> None:
    queue = await backend.open()
    await backend.inject(b"\xff not a job")
    await backend.inject(b'{"v": 1, "id": "x"}')
    job = make_job()
    await queue.enqueue(job)
    delivery = await next_delivery(queue.consume(prefetch=1))
    assert delivery.job == job
    await queue.ack(delivery)
    assert await queue.dead_letters() == 2
    assert await queue.depth() == 0
    reasons = await backend.dead_reasons()
    assert len(reasons) == 2 and all("not a mailbench job" in r for r in reasons)


async def test_prefetch_bounds_unsettled_deliveries(backend: Backend) -> None:
    queue = await backend.open()
    for n in range(3):
        await queue.enqueue(make_job(n))
    deliveries = queue.consume(prefetch=2)
    held = [await next_delivery(deliveries), await next_delivery(deliveries)]
    third = asyncio.ensure_future(next_delivery(deliveries))
    await asyncio.sleep(0.3)
    assert not third.done()
    await queue.ack(held[0])
    await queue.ack(await third)
    await queue.ack(held[1])
    assert await queue.depth() == 0


async def test_close_ends_consume(backend: Backend) -> None:
    queue = await backend.open()

    async def drain() -> None:
        async for _ in queue.consume(prefetch=1):
            pass

    consumer = asyncio.ensure_future(drain())
    await asyncio.sleep(0.1)
    await queue.close()
    await asyncio.wait_for(consumer, TIMEOUT)


async def test_a_closed_queue_refuses_jobs_and_yields_nothing(backend: Backend) -> None:
    queue = await backend.open()
    await queue.enqueue(make_job())
    await queue.close()
    with pytest.raises(QueueError):
        await queue.enqueue(make_job())
    assert [delivery async for delivery in queue.consume(prefetch=1)] == []
    await queue.close()  # twice is harmless


async def test_concurrent_enqueues_are_each_consumed_exactly_once(backend: Backend) -> None:
    producer = await backend.open()
    jobs = [make_job(n) for n in range(300)]
    await asyncio.gather(*(producer.enqueue(job) for job in jobs))
    assert await producer.depth() == len(jobs)

    seen: list[str] = []
    acked = 0

    async def consume(queue: Queue) -> None:
        nonlocal acked
        async for delivery in queue.consume(prefetch=20):
            seen.append(delivery.job.id)
            await queue.ack(delivery)
            acked += 1

    # A one-second visibility is more than moto's calls to extend it can keep up with on
    # a busy machine: there the redelivery would be the lease's, not a bug's.
    slow = backend.kind in SLOWER
    consumers = [await backend.open(long_lease=slow), await backend.open(long_lease=slow)]
    tasks = [asyncio.ensure_future(consume(queue)) for queue in consumers]
    deadline = time.monotonic() + TIMEOUT * SLOWER.get(backend.kind, 1)
    while acked < len(jobs) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # room for a duplicate to show up
    for queue in consumers:
        await queue.close()
    await asyncio.gather(*tasks)
    assert sorted(seen) == sorted(job.id for job in jobs)
    assert await producer.depth() == 0


@pytest.mark.parametrize(
    ("scheme", "broker"),
    [("amqp", "RabbitMQ"), ("redis", "Redis"), ("postgresql", "PostgreSQL"), ("sqs", "SQS")],
)
async def test_unreachable_broker_is_one_clear_sentence(scheme: str, broker: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # free once closed: nothing listens there
    url = f"{scheme}://someone:s3cret@127.0.0.1:{port}/x"
    with pytest.raises(ServiceUnavailable) as caught:
        await asyncio.wait_for(open_queue(url, "jobs"), TIMEOUT)
    message = str(caught.value)
    assert message.startswith(f"cannot connect to {broker} at ")
    assert f"127.0.0.1:{port}" in message and "s3cret" not in message
    assert caught.value.__cause__ is not None


async def test_sqlite_urls_name_relative_and_absolute_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    relative = await open_queue("sqlite:///data/relative.db?lease=5", "jobs")
    absolute = await open_queue(f"sqlite:///{tmp_path / 'absolute.db'}", "jobs")
    await relative.enqueue(make_job())
    assert await relative.depth() == 1 and await absolute.depth() == 0
    for queue in (relative, absolute):
        await queue.close()
    assert (tmp_path / "data" / "relative.db").is_file()
    assert (tmp_path / "absolute.db").is_file()
    with pytest.raises(ConfigError, match="does not exist"):
        await open_queue(f"sqlite:///{tmp_path / 'missing' / 'jobs.db'}", "jobs")
    with pytest.raises(ConfigError, match="lease"):
        await open_queue(f"sqlite:///{tmp_path / 'jobs.db'}?lease=soon", "jobs")


@pytest.mark.integration
async def test_postgres_consumer_is_woken_by_notify_not_by_polling(postgres_url: str) -> None:
    backend = Backend("postgres", with_query(postgres_url, "poll=30"))
    producer, consumer = await backend.open(), await backend.open()
    try:
        deliveries = consumer.consume(prefetch=1)
        waiting = asyncio.ensure_future(next_delivery(deliveries))
        await asyncio.sleep(0.3)  # the consumer found nothing and sleeps for `poll`
        job = make_job()
        await producer.enqueue(job)
        started = time.monotonic()
        delivery = await waiting
        assert delivery.job == job
        assert time.monotonic() - started < 2
        await consumer.ack(delivery)
    finally:
        for queue in backend.opened:
            await queue.close()
        await _postgres_clean(backend)


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.integration)], indirect=True
)
async def test_sql_claim_whose_reply_was_lost_expires_although_its_consumer_lives(
    backend: Backend,
) -> None:
    queue: Any = await backend.open()
    deliveries = queue.consume(prefetch=1)
    waiting = asyncio.ensure_future(next_delivery(deliveries))
    await asyncio.sleep(0.2)  # the lease keeper runs
    job = make_job()
    # A row this very consumer claimed, but the reply never reached it.
    if backend.kind == "sqlite":
        with sqlite3.connect(_sqlite_file(backend)) as conn:
            conn.execute(
                "INSERT INTO mailbench_jobs (queue, state, payload, run_at, locked_until,"
                " locked_by) VALUES (?, 'running', ?, 0, ?, ?)",
                (backend.name, encode_job(job), time.time() + 1, queue.consumer_id),
            )
    else:
        import asyncpg

        conn = await asyncpg.connect(backend.url.partition("?")[0])
        await conn.execute(
            "INSERT INTO mailbench_jobs (queue, state, payload, locked_until, locked_by)"
            " VALUES ($1, 'running', $2, now() + interval '1 second', $3)",
            backend.name,
            encode_job(job),
            queue.consumer_id,
        )
        await conn.close()
    delivery = await waiting
    assert delivery.job == job
    await queue.ack(delivery)


@pytest.mark.integration
async def test_redis_burst_of_more_enqueues_than_connections_waits_its_turn(
    redis_url: str,
) -> None:
    """A server under a burst: many more enqueues at once than pool connections, for
    longer than the longest wait for a connection. redis-py's own blocking pool let the
    task just releasing a connection take it again, so a waiter starved until its
    timeout ("No connection available") and the server answered 5xx."""
    wait = 1.0
    backend = Backend("redis", with_query(redis_url, f"max_connections=4&connection_wait={wait:g}"))
    queue = await backend.open()
    stop_at = time.monotonic() + 3 * wait
    enqueued = 0

    async def enqueuer() -> None:
        nonlocal enqueued
        while time.monotonic() < stop_at:
            await queue.enqueue(make_job())
            enqueued += 1

    try:
        await asyncio.gather(*(enqueuer() for _ in range(64)))
        assert await queue.depth() == enqueued > 64
    finally:
        await queue.close()
        await _redis_clean(backend)


@pytest.mark.integration
async def test_redis_gone_is_one_clear_sentence_not_a_wait(
    make_service_settings: Callable[[], ServiceSettings],
    service_unavailable: Callable[[str], NoReturn],
) -> None:
    with Services(make_service_settings()) as private:
        try:
            url = private.start("redis")
        except ServiceUnavailable as exc:
            service_unavailable(str(exc))
        queue = await open_queue(with_query(url, "connection_wait=30"), "gone")
        await queue.enqueue(make_job())
        private.stop("redis")
        with pytest.raises(QueueError) as caught:
            await asyncio.wait_for(queue.enqueue(make_job()), TIMEOUT)
        await queue.close()
    message = str(caught.value)
    assert message.startswith("Redis at redis://") and "failed to add job" in message
    assert "***" in message or "@" not in message  # the password stays hidden
    assert caught.value.__cause__ is not None


async def test_a_sqlite_file_from_before_delivery_counts_gets_the_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:  # the table as it was made before
        conn.execute(
            "CREATE TABLE mailbench_jobs (id INTEGER PRIMARY KEY, queue TEXT NOT NULL,"
            " state TEXT NOT NULL DEFAULT 'available', payload BLOB NOT NULL,"
            " run_at REAL NOT NULL, locked_until REAL, locked_by TEXT, reason TEXT)"
        )
        conn.execute(
            "INSERT INTO mailbench_jobs (queue, payload, run_at) VALUES ('jobs', ?, 0)",
            (encode_job(make_job()),),
        )
    queue = await open_queue(f"sqlite:///{path}", "jobs")
    try:
        delivery = await next_delivery(queue.consume(prefetch=1))
        assert delivery.deliveries == 1
        await queue.ack(delivery)
    finally:
        await queue.close()
