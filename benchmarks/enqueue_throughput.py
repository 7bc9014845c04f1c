"""Enqueue throughput of each queue backend against its raw client's ceiling.

For every backend with a URL, in one process and with the same driver library:

* **raw**: the bare durable write the backend is built on — a confirmed persistent
  publish (aio-pika), ``XADD`` (redis-py), a single-row ``INSERT`` (asyncpg), an
  ``INSERT`` + commit (sqlite3, which has one writer, so without concurrency);
* **queue**: ``Queue.enqueue`` through :func:`queues.open_queue`;
* **consume+ack**: the same jobs consumed with ``prefetch = concurrency`` and each acked
  in its own task, as a worker does.

N jobs go through K concurrent enqueuers. ``ratio = queue / raw`` (target ≥ 50%); the
median of ``--rounds`` runs is reported. Noisy machines swing ±20%.

    python benchmarks/enqueue_throughput.py --jobs 5000 --concurrency 100 \\
        --amqp amqp://guest:guest@127.0.0.1:5672/ --redis redis://127.0.0.1:6379/0 \\
        --postgres postgresql://postgres@127.0.0.1:5432/postgres

URLs also come from ``AMQP_URL``, ``REDIS_URL`` and ``DATABASE_URL``; a backend without
one is skipped. SQLite runs on a temporary file unless ``--sqlite`` names one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from queues import Email, Job, encode_job, open_queue

Op = Callable[[int], Awaitable[None]]


def make_job(n: int) -> Job:
    email = Email(to=f"user{n}@example.com", subject="Your receipt", text="Thank you. " * 20)
    return Job(id=uuid.uuid4().hex, email=email)


async def rate(jobs: int, concurrency: int, op: Op) -> float:
    """Run ``op(0..jobs-1)`` on ``concurrency`` tasks; return operations per second."""
    counter = iter(range(jobs))

    async def lane() -> None:
        for n in counter:
            await op(n)

    start = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return jobs / (time.perf_counter() - start)


# --- raw ceilings: (setup, op, cleanup) per backend, on the backend's own driver -------


async def raw_rabbitmq(url: str, jobs: int, concurrency: int) -> float:
    import aio_pika

    connection = await aio_pika.connect_robust(url)
    channel = await connection.channel(publisher_confirms=True)
    queue = await channel.declare_queue(f"bench-raw-{uuid.uuid4().hex[:8]}", durable=True)

    async def op(n: int) -> None:
        body = encode_job(make_job(n))
        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await channel.default_exchange.publish(message, routing_key=queue.name)

    try:
        return await rate(jobs, concurrency, op)
    finally:
        await queue.delete(if_unused=False, if_empty=False)
        await connection.close()


async def raw_redis(url: str, jobs: int, concurrency: int) -> float:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(url))
    key = f"bench-raw-{uuid.uuid4().hex[:8]}"

    async def op(n: int) -> None:
        await client.xadd(key, {"job": encode_job(make_job(n))})

    try:
        return await rate(jobs, concurrency, op)
    finally:
        await client.delete(key)
        await client.aclose()


async def raw_postgres(url: str, jobs: int, concurrency: int) -> float:
    import asyncpg

    pool = await asyncpg.create_pool(url, min_size=1, max_size=10)
    table = f"bench_raw_{uuid.uuid4().hex[:8]}"
    await pool.execute(
        f"CREATE TABLE {table} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
        " queue text NOT NULL, payload bytea NOT NULL)"
    )

    async def op(n: int) -> None:
        sql = f"INSERT INTO {table} (queue, payload) VALUES ($1, $2)"
        await pool.execute(sql, "raw", encode_job(make_job(n)))

    try:
        return await rate(jobs, concurrency, op)
    finally:
        await pool.execute(f"DROP TABLE {table}")
        await pool.close()


async def raw_sqlite(url: str, jobs: int, concurrency: int) -> float:
    path = url.removeprefix("sqlite:///").partition("?")[0] + ".raw"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("CREATE TABLE IF NOT EXISTS raw (id INTEGER PRIMARY KEY, payload BLOB)")
    start = time.perf_counter()
    for n in range(jobs):  # one connection, one writer: concurrency does not apply
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO raw (payload) VALUES (?)", (encode_job(make_job(n)),))
        conn.execute("COMMIT")
    result = jobs / (time.perf_counter() - start)
    conn.close()
    for suffix in ("", "-wal", "-shm"):
        Path(path + suffix).unlink(missing_ok=True)
    return result


RAW: dict[str, Callable[[str, int, int], Awaitable[float]]] = {
    "rabbitmq": raw_rabbitmq,
    "redis": raw_redis,
    "postgres": raw_postgres,
    "sqlite": raw_sqlite,
}

# --- through the backend ------------------------------------------------------------


async def forget(kind: str, url: str, name: str) -> None:
    """Remove what the backend created for queue ``name`` (the broker may be the user's)."""
    if kind == "rabbitmq":
        import aio_pika

        from queues.rabbitmq import RETRY_LADDER_MS

        async with await aio_pika.connect(url) as connection:
            channel = await connection.channel()
            for suffix in ["", ".dead", *(f".retry.{ms}ms" for ms in RETRY_LADDER_MS)]:
                await channel.queue_delete(name + suffix)
    elif kind == "redis":
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(url.partition("?")[0])
        await client.delete(*(f"mailbench:{{{name}}}:{key}" for key in ("jobs", "delayed", "dead")))
        await client.aclose()
    elif kind == "postgres":
        import asyncpg

        conn = await asyncpg.connect(url.partition("?")[0])
        await conn.execute("DELETE FROM mailbench_jobs WHERE queue = $1", name)
        await conn.close()


async def through_queue(kind: str, url: str, jobs: int, concurrency: int) -> tuple[float, float]:
    """Enqueue rate and consume+ack rate of ``jobs`` through ``open_queue(url)``."""
    name = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        return await _through_queue(url, name, jobs, concurrency)
    finally:
        await forget(kind, url, name)


async def _through_queue(url: str, name: str, jobs: int, concurrency: int) -> tuple[float, float]:
    queue: Any = await open_queue(url, name)
    try:
        enqueue_rate = await rate(jobs, concurrency, lambda n: queue.enqueue(make_job(n)))
        acked = 0
        done = asyncio.Event()
        pending: set[asyncio.Task[None]] = set()

        async def ack(delivery: Any) -> None:
            nonlocal acked
            await queue.ack(delivery)
            acked += 1
            if acked == jobs:
                done.set()

        async def consume() -> None:
            async for delivery in queue.consume(prefetch=concurrency):
                task = asyncio.create_task(ack(delivery))
                pending.add(task)
                task.add_done_callback(pending.discard)

        start = time.perf_counter()
        consumer = asyncio.create_task(consume())
        await asyncio.wait_for(done.wait(), timeout=300)
        consume_rate = jobs / (time.perf_counter() - start)
        consumer.cancel()
        if await queue.depth() != 0:
            raise RuntimeError(f"{url}: queue not drained after {jobs} acks")
        return enqueue_rate, consume_rate
    finally:
        await queue.close()


async def bench(kind: str, url: str, args: argparse.Namespace) -> None:
    raws, queued, consumed = [], [], []
    for _ in range(args.rounds):
        raws.append(await RAW[kind](url, args.jobs, args.concurrency))
        enqueue_rate, consume_rate = await through_queue(kind, url, args.jobs, args.concurrency)
        queued.append(enqueue_rate)
        consumed.append(consume_rate)
    raw, queue = statistics.median(raws), statistics.median(queued)
    ratio = queue / raw
    verdict = "ok" if ratio >= 0.5 else "BELOW 50%"
    print(
        f"{kind:<9} {raw:>10,.0f} {queue:>10,.0f} {ratio:>6.0%} {verdict:<10}"
        f" {statistics.median(consumed):>12,.0f}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=5000, help="jobs per round (N)")
    parser.add_argument("--concurrency", type=int, default=100, help="enqueuers (K)")
    parser.add_argument("--rounds", type=int, default=3, help="median of this many runs")
    parser.add_argument("--amqp", default=os.environ.get("AMQP_URL"))
    parser.add_argument("--redis", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--postgres", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--sqlite", help="sqlite:///path (default: a temporary file)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        urls = {
            "rabbitmq": args.amqp,
            "redis": args.redis,
            "postgres": args.postgres,
            "sqlite": args.sqlite or f"sqlite:///{scratch}/bench.db",
        }
        print(f"N={args.jobs} jobs, K={args.concurrency} concurrent, median of {args.rounds}")
        header = f"{'backend':<9} {'raw/s':>10} {'queue/s':>10} {'ratio':>6} {'':<10}"
        print(f"{header} {'consume+ack/s':>12}")
        for kind, url in urls.items():
            if not url:
                print(f"{kind:<9} skipped: no URL")
                continue
            asyncio.run(bench(kind, url, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
