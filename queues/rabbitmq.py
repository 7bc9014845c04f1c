"""RabbitMQ backend (aio-pika): ``amqp://user:pass@host:port/vhost``.

Queues per name: ``name`` (durable), ``name.dead`` (dead letters, reason in the
``x-mailbench-reason`` header) and ``name.retry.<ms>ms`` wait queues whose TTL
dead-letters back into ``name``. Retry delays are rounded *up* to a fixed ladder, so
every message in one wait queue shares its TTL and nothing waits behind a longer one.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, MessageProcessError

from queues.base import Delivery, Job, decode_job, encode_job
from queues.errors import InvalidJob, QueueError, ServiceUnavailable

log = logging.getLogger(__name__)

REASON_HEADER = "x-mailbench-reason"
CONNECT_TIMEOUT = 10.0
_ERRORS = (*CONNECTION_EXCEPTIONS, MessageProcessError)
# 10 ms … 10 000 s in 1-1.5-2-3-5-7 steps: a retry is at most 1.7x late, never early.
RETRY_LADDER_MS: tuple[int, ...] = (
    *(int(m * 10**e) for e in range(1, 7) for m in (1, 1.5, 2, 3, 5, 7)),
    10_000_000,
)


def _wait_queue_args(name: str, ttl_ms: int) -> dict[str, Any]:
    return {
        "x-message-ttl": ttl_ms,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": name,
    }


def _safe(url: str) -> str:
    """``url`` without credentials, for messages."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


class RabbitMQQueue:
    def __init__(self, url: str, name: str, connection: AbstractRobustConnection) -> None:
        self._url = url
        self._name = name
        self._connection = connection
        self._publisher: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._inboxes: set[asyncio.Queue[AbstractIncomingMessage | None]] = set()
        self._unacked = 0
        self._closed = False

    async def _start(self) -> None:
        self._publisher = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        await self._publisher.declare_queue(self._name, durable=True)
        await self._publisher.declare_queue(f"{self._name}.dead", durable=True)
        self._exchange = self._publisher.default_exchange
        # All wait queues exist from the start, so depth() can count them from any process.
        underlay = await self._publisher.get_underlay_channel()
        for queue, arguments in self._wait_queues():
            await underlay.queue_declare(queue, durable=True, arguments=arguments)

    def _wait_queues(self) -> list[tuple[str, dict[str, Any]]]:
        return [
            (f"{self._name}.retry.{ms}ms", _wait_queue_args(self._name, ms))
            for ms in RETRY_LADDER_MS
        ]

    def _fail(self, action: str, exc: BaseException) -> QueueError:
        return QueueError(f"RabbitMQ at {self._url} failed to {action}: {exc!r}")

    async def _publish(self, body: bytes, routing_key: str, **props: Any) -> None:
        assert self._exchange is not None
        message = aio_pika.Message(
            body,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            content_type="application/json",
            **props,
        )
        # With confirms on, this returns once the broker has the message on disk.
        await self._exchange.publish(message, routing_key=routing_key)

    async def enqueue(self, job: Job) -> None:
        try:
            await self._publish(encode_job(job), self._name, message_id=job.id)
        except _ERRORS as exc:
            raise self._fail(f"publish job {job.id}", exc) from exc

    async def consume(self, prefetch: int) -> AsyncIterator[Delivery]:
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        if self._closed:
            return
        inbox: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()

        async def on_message(message: AbstractIncomingMessage) -> None:
            self._unacked += 1
            inbox.put_nowait(message)

        try:
            channel = await self._connection.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=prefetch)
            queue = await channel.declare_queue(self._name, durable=True)
            consumer_tag = await queue.consume(on_message)
        except _ERRORS as exc:
            raise self._fail(f"start consuming {self._name!r}", exc) from exc
        self._inboxes.add(inbox)
        try:
            while (message := await inbox.get()) is not None:
                try:
                    job = decode_job(message.body)
                except InvalidJob as exc:
                    await self._dead_letter(message, str(exc))
                    continue
                yield Delivery(job, message)
        finally:
            self._inboxes.discard(inbox)
            if not self._closed and not channel.is_closed:
                # Deliveries already yielded stay ours to settle; the rest go back now
                # (or when the channel closes, should this fail).
                try:
                    await queue.cancel(consumer_tag)
                    while not inbox.empty():
                        if (left := inbox.get_nowait()) is not None:
                            await self._settle(left, left.nack(requeue=True))
                except (*_ERRORS, QueueError) as exc:
                    log.warning("RabbitMQ at %s: stopping a consumer failed: %r", self._url, exc)

    async def _settle(self, message: AbstractIncomingMessage, action: Awaitable[None]) -> None:
        self._unacked -= 1
        try:
            await action
        except _ERRORS as exc:
            raise self._fail(f"settle message {message.message_id}", exc) from exc

    async def ack(self, delivery: Delivery) -> None:
        message: AbstractIncomingMessage = delivery.handle
        await self._settle(message, message.ack())

    async def retry(self, delivery: Delivery, delay: float) -> None:
        job = delivery.job.next_attempt()
        try:
            if delay <= 0:
                routing_key = self._name
            else:
                routing_key = await self._declare_wait_queue(delay)
            await self._publish(encode_job(job), routing_key, message_id=job.id)
        except _ERRORS as exc:
            raise self._fail(f"schedule the retry of job {job.id}", exc) from exc
        await self.ack(delivery)

    async def _declare_wait_queue(self, delay: float) -> str:
        index = bisect.bisect_left(RETRY_LADDER_MS, delay * 1000)
        if index == len(RETRY_LADDER_MS):
            limit = RETRY_LADDER_MS[-1] / 1000
            raise QueueError(f"RabbitMQ retry delays are limited to {limit:g} s, not {delay} s")
        ttl_ms = RETRY_LADDER_MS[index]
        assert self._publisher is not None
        # Declared again in case it was deleted, on the plain underlying channel: a robust
        # channel would remember every declaration to replay it after a reconnect.
        underlay = await self._publisher.get_underlay_channel()
        wait_queue = f"{self._name}.retry.{ttl_ms}ms"
        await underlay.queue_declare(
            wait_queue, durable=True, arguments=_wait_queue_args(self._name, ttl_ms)
        )
        return wait_queue

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        await self._dead_letter(delivery.handle, reason)

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str) -> None:
        try:
            await self._publish(
                message.body,
                f"{self._name}.dead",
                message_id=message.message_id,
                headers={REASON_HEADER: reason},
            )
        except _ERRORS as exc:
            raise self._fail(f"dead-letter message {message.message_id}", exc) from exc
        await self._settle(message, message.ack())

    async def depth(self) -> int:
        """Ready messages, waiting retries, and this object's unsettled deliveries (the
        broker does not report other consumers' unacked messages over AMQP)."""
        # Wait queues first, main queue last: a retry that moves while we count is then
        # counted twice rather than missed, so a drained queue is never reported early.
        counts = await self._declare_counts([*self._wait_queues(), (self._name, None)])
        return sum(counts) + self._unacked

    async def dead_letters(self) -> int:
        (count,) = await self._declare_counts([(f"{self._name}.dead", None)])
        return count

    async def _declare_counts(self, queues: list[tuple[str, dict[str, Any] | None]]) -> list[int]:
        # A fresh, non-robust channel: a robust channel answers a passive declare from
        # its cache, with a stale message count.
        try:
            transport = self._connection.transport
            if transport is None:
                raise ConnectionError("not connected")
            channel = await transport.connection.channel()
            try:
                counts = []
                for queue, arguments in queues:
                    passive = arguments is None
                    ok = await channel.queue_declare(
                        queue, passive=passive, durable=True, arguments=arguments
                    )
                    counts.append(ok.message_count or 0)
                return counts
            finally:
                await channel.close()
        except _ERRORS as exc:
            raise self._fail("count messages", exc) from exc

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for inbox in self._inboxes:
            inbox.put_nowait(None)
        # Closing the connection closes the consumer channels: the broker requeues every
        # delivery that was not acked.
        self._unacked = 0
        try:
            await self._connection.close()
        except _ERRORS as exc:
            log.warning("closing the RabbitMQ connection to %s failed: %r", self._url, exc)


async def open_rabbitmq(url: str, name: str) -> RabbitMQQueue:
    try:
        connection = await aio_pika.connect_robust(url, timeout=CONNECT_TIMEOUT)
    except _ERRORS as exc:
        raise ServiceUnavailable(f"cannot connect to RabbitMQ at {_safe(url)}: {exc}") from exc
    queue = RabbitMQQueue(_safe(url), name, connection)
    try:
        await queue._start()
    except _ERRORS as exc:
        await connection.close()
        raise ServiceUnavailable(
            f"cannot declare queue {name!r} on RabbitMQ at {_safe(url)}: {exc}"
        ) from exc
    return queue
