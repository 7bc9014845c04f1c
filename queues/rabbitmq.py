"""RabbitMQ backend (aio-pika): ``amqp://user:pass@host:port/vhost``.

Queues per name: ``name`` (durable), ``name.dead`` (dead letters, reason in the
``x-mailbench-reason`` header) and ``name.retry.<ms>ms`` wait queues whose TTL
dead-letters back into ``name``. Retry delays are rounded *up* to a fixed ladder, so
every message in one wait queue shares its TTL and nothing waits behind a longer one.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, MessageProcessError

from queues.base import Delivery, Job, decode_job, encode_job
from queues.errors import ConfigError, InvalidJob, MailbenchError, QueueError, ServiceUnavailable
from queues.urls import redact_url

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


@contextlib.contextmanager
def _errors(
    sentence: str,
    error: type[MailbenchError] = QueueError,
    detail: Callable[[BaseException], str] = repr,
) -> Iterator[None]:
    """Where aio-pika's errors become ours: one raised in the block comes out as
    ``error(f"{sentence}: {detail(exc)}")``, caused by it. The repr by default, as many
    of them say nothing on their own (``ChannelInvalidStateError()``)."""
    try:
        yield
    except _ERRORS as exc:
        raise error(f"{sentence}: {detail(exc)}") from exc


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

    def _errors(self, action: str) -> contextlib.AbstractContextManager[None]:
        return _errors(f"RabbitMQ at {self._url} failed to {action}")

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
        with self._errors(f"publish job {job.id}"):
            await self._publish(encode_job(job), self._name, message_id=job.id)

    async def consume(self, prefetch: int) -> AsyncIterator[Delivery]:
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        if self._closed:
            return
        inbox: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()

        async def on_message(message: AbstractIncomingMessage) -> None:
            self._unacked += 1
            inbox.put_nowait(message)

        with self._errors(f"start consuming {self._name!r}"):
            channel = await self._connection.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=prefetch)
            queue = await channel.declare_queue(self._name, durable=True)
            consumer_tag = await queue.consume(on_message)
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
                    with self._errors("stop a consumer"):
                        await queue.cancel(consumer_tag)
                        while not inbox.empty():
                            if (left := inbox.get_nowait()) is not None:
                                await self._settle(left, left.nack(requeue=True))
                except QueueError as exc:
                    log.warning("%s", exc)

    async def _settle(self, message: AbstractIncomingMessage, action: Awaitable[None]) -> None:
        self._unacked -= 1
        with self._errors(f"settle message {message.message_id}"):
            await action

    async def ack(self, delivery: Delivery) -> None:
        message: AbstractIncomingMessage = delivery.handle
        await self._settle(message, message.ack())

    async def retry(self, delivery: Delivery, delay: float) -> None:
        job = delivery.job.next_attempt()
        with self._errors(f"schedule the retry of job {job.id}"):
            if delay <= 0:
                routing_key = self._name
            else:
                routing_key = await self._declare_wait_queue(delay)
            await self._publish(encode_job(job), routing_key, message_id=job.id)
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
        with self._errors(f"dead-letter message {message.message_id}"):
            await self._publish(
                message.body,
                f"{self._name}.dead",
                message_id=message.message_id,
                headers={REASON_HEADER: reason},
            )
        await self._settle(message, message.ack())

    async def depth(self) -> int:
        """Ready messages, waiting retries, and this object's unsettled deliveries; not
        other consumers' unacknowledged messages, which AMQP does not report (the
        harness counts those through the broker, see :meth:`queues.base.Queue.depth`)."""
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
        with self._errors("count messages"):
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
            with self._errors("close the connection"):
                await self._connection.close()
        except QueueError as exc:
            log.warning("%s", exc)


async def open_rabbitmq(url: str, name: str) -> RabbitMQQueue:
    shown = redact_url(url)
    try:
        with _errors(f"cannot connect to RabbitMQ at {shown}", ServiceUnavailable, str):
            connection = await aio_pika.connect_robust(url, timeout=CONNECT_TIMEOUT)
    except ValueError as exc:  # a port or parameter that does not parse
        raise ConfigError(f"the RabbitMQ URL {shown} cannot be used: {exc}") from exc
    queue = RabbitMQQueue(shown, name, connection)
    try:
        with _errors(
            f"cannot declare queue {name!r} on RabbitMQ at {shown}", ServiceUnavailable, str
        ):
            await queue._start()
    except ServiceUnavailable:
        await connection.close()
        raise
    return queue
