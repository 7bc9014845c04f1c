"""RabbitMQ backend (aio-pika): ``amqp://user:pass@host:port/vhost``; RabbitMQ 3.10 or later.

Queues per name: ``name``, ``name.dead`` (dead letters, reason in the
``x-mailbench-reason`` header) and ``name.retry.<ms>ms`` wait queues whose TTL
dead-letters back into ``name``. Retry delays are rounded *up* to a fixed ladder, so
every message in one wait queue shares its TTL and nothing waits behind a longer one.

All of them are quorum queues. A retry leaves the worker's hands: its original is
acknowledged once the wait queue has confirmed the new attempt, and the way back into
``name`` is the broker's own dead-lettering, which publishes without confirms from a
classic queue (at most once: a message whose target cannot take it at that moment, as
while the broker recovers from a crash, is dropped). A quorum wait queue with
``x-dead-letter-strategy: at-least-once`` keeps the message until the target has
confirmed it, retrying every ``dead_letter_worker_publisher_confirm_timeout`` (180 s by
default); that strategy needs ``x-overflow: reject-publish``. Quorum queues also count a
message's deliveries (``x-delivery-count``), which a classic queue does not; ``name``
dead-letters a job beyond :data:`DELIVERY_LIMIT` into ``name.dead`` itself.
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
from aiormq.exceptions import ChannelInvalidStateError, ChannelPreconditionFailed

from queues.base import Delivery, Job, decode_job, encode_job
from queues.errors import ConfigError, InvalidJob, MailbenchError, QueueError, ServiceUnavailable
from queues.urls import redact_url

log = logging.getLogger(__name__)

REASON_HEADER = "x-mailbench-reason"
# A handed-back job is published again, as a new message: this carries its deliveries so far.
CARRIED_HEADER = "x-mailbench-deliveries"
# Loop turns a stopping consumer yields for deliveries still on their way to its callback.
_LATE_DELIVERY_TURNS = 5
CONNECT_TIMEOUT = 10.0
_ERRORS = (*CONNECTION_EXCEPTIONS, MessageProcessError)
# 10 ms … 10 000 s in 1-1.5-2-3-5-7 steps: a retry is at most 1.7x late, never early.
RETRY_LADDER_MS: tuple[int, ...] = (
    *(int(m * 10**e) for e in range(1, 7) for m in (1, 1.5, 2, 3, 5, 7)),
    10_000_000,
)


QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}
# The broker's own backstop for a job redelivered without end, far above the worker's
# limit (--max-deliveries): RabbitMQ 4 sets 20 by default, and drops what exceeds it
# unless the queue dead-letters.
DELIVERY_LIMIT = 20


def _main_queue_args(name: str) -> dict[str, Any]:
    return {
        **QUORUM,
        "x-delivery-limit": DELIVERY_LIMIT,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": f"{name}.dead",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def _wait_queue_args(name: str, ttl_ms: int) -> dict[str, Any]:
    return {
        **QUORUM,
        "x-message-ttl": ttl_ms,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": name,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",  # without it the strategy falls back to at-most-once
    }


def _deliveries(message: AbstractIncomingMessage) -> int:
    """The times the broker has handed ``message``'s job out, this one included: a quorum
    queue counts the earlier ones in ``x-delivery-count`` (absent the first time), a
    classic queue only flags a redelivery; plus those a hand-back carried over."""
    headers = message.headers or {}
    carried = headers.get(CARRIED_HEADER)
    earlier = carried if isinstance(carried, int) and carried > 0 else 0
    count = headers.get("x-delivery-count")
    if isinstance(count, int) and count >= 0:
        return earlier + count + 1
    return earlier + (2 if message.redelivered else 1)


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
        self._exchange = self._publisher.default_exchange
        with self._refused(self._name):
            # On the robust channel, which declares them again after a reconnect.
            await self._publisher.declare_queue(
                self._name, durable=True, arguments=_main_queue_args(self._name)
            )
            await self._publisher.declare_queue(
                f"{self._name}.dead", durable=True, arguments=QUORUM
            )
        # All wait queues exist from the start, so depth() can count them from any process.
        # Declared on the plain underlying channel: a robust channel would remember every
        # declaration to replay it after a reconnect.
        underlay = await self._publisher.get_underlay_channel()
        for queue, arguments in self._wait_queues():
            with self._refused(queue):
                await underlay.queue_declare(queue, durable=True, arguments=arguments)

    @contextlib.contextmanager
    def _refused(self, queue: str) -> Iterator[None]:
        try:
            yield
        except ChannelPreconditionFailed as exc:
            raise ConfigError(
                f"RabbitMQ at {self._url} refused queue {queue!r} as mailbench declares it "
                f"({exc.args[0] if exc.args else exc!r}): quorum queues with message TTL "
                "and at-least-once dead-lettering need RabbitMQ 3.10 or later, and a queue "
                "left by an older mailbench (a classic queue) must be deleted first."
            ) from exc

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
        stopping = False
        late: set[asyncio.Task[None]] = set()

        async def on_message(message: AbstractIncomingMessage) -> None:
            self._unacked += 1
            if stopping:  # no one reads the inbox any more: back at once, uncounted
                task = asyncio.current_task()
                if task is not None:
                    late.add(task)
                await self._give_back_quietly(message)
                return
            inbox.put_nowait(message)

        with self._errors(f"start consuming {self._name!r}"):
            channel = await self._connection.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=prefetch)
            queue = await channel.declare_queue(
                self._name, durable=True, arguments=_main_queue_args(self._name)
            )
            consumer_tag = await queue.consume(on_message)
        self._inboxes.add(inbox)
        try:
            while (message := await inbox.get()) is not None:
                try:
                    job = decode_job(message.body)
                except InvalidJob as exc:
                    await self._dead_letter(message, str(exc))
                    continue
                yield Delivery(job, message, deliveries=_deliveries(message))
        finally:
            self._inboxes.discard(inbox)
            if not self._closed and not channel.is_closed:
                # Deliveries already yielded stay ours to settle; the rest go back now
                # (or when the channel closes, should this fail).
                stopping = True
                try:
                    with self._errors("stop a consumer"):
                        await queue.cancel(consumer_tag)
                        while not inbox.empty():
                            if (left := inbox.get_nowait()) is not None:
                                await self._give_back(left, _deliveries(left) - 1)
                except QueueError as exc:
                    log.warning("%s", exc)
                # Each delivery reaches on_message two tasks after its frame (aiormq's,
                # then aio-pika's), so some sent before the cancel's reply arrive after
                # it: they hand themselves back; wait for them, so that nothing stays
                # held on the channel (a crash would count it once more).
                for _ in range(_LATE_DELIVERY_TURNS):
                    await asyncio.sleep(0)
                if late:
                    await asyncio.wait(late)

    async def _settle(
        self, message: AbstractIncomingMessage, what: str, action: Callable[[], Awaitable[None]]
    ) -> None:
        """Settle ``message`` once with ``action`` (its ack or nack); if that fails while
        its channel lives, hand it back."""
        self._unacked -= 1
        try:
            with self._errors(f"{what} message {message.message_id}"):
                await action()
        except QueueError:
            await self._requeue(message)
            raise

    async def hand_back(self, delivery: Delivery) -> None:
        await self._give_back(delivery.handle, delivery.deliveries - 1)

    async def _give_back(self, message: AbstractIncomingMessage, earlier: int) -> None:
        """Return a message never started to the queue at once, uncounted. A nack would
        count as a delivery (``x-delivery-count``); so a copy that carries the count so
        far is published, confirmed, and then the original acknowledged."""
        headers = {CARRIED_HEADER: earlier} if earlier > 0 else {}
        publish = self._publish(
            message.body, self._name, message_id=message.message_id, headers=headers
        )
        await self._publish_or_requeue(message, f"hand back message {message.message_id}", publish)
        await self._settle(message, "acknowledge", message.ack)

    async def _give_back_quietly(self, message: AbstractIncomingMessage) -> None:
        try:
            await self._give_back(message, _deliveries(message) - 1)
        except QueueError as exc:
            log.warning("%s; it comes back when the channel closes", exc)

    async def _requeue(self, message: AbstractIncomingMessage) -> None:
        """Requeue a message that could not be settled. Left unacknowledged on a live
        channel it would be redelivered only when the channel closes, and hold one of
        the consumer's prefetch slots until then; on a closed channel the broker has
        requeued it already."""
        if message.processed:
            return
        try:
            await message.nack(requeue=True)
        except ChannelInvalidStateError:
            pass  # the channel is closed: the broker has requeued it
        except _ERRORS as exc:
            log.warning(
                "RabbitMQ at %s could not hand back message %s (%r): it returns when its "
                "channel closes",
                self._url,
                message.message_id,
                exc,
            )

    async def _publish_or_requeue(
        self, message: AbstractIncomingMessage, what: str, publish: Awaitable[None]
    ) -> None:
        """The confirmed publish that comes before settling ``message``; if it fails, the
        message goes back to the queue rather than stay unsettled."""
        try:
            with self._errors(what):
                await publish
        except QueueError:
            self._unacked -= 1
            await self._requeue(message)
            raise

    async def ack(self, delivery: Delivery) -> None:
        message: AbstractIncomingMessage = delivery.handle
        await self._settle(message, "acknowledge", message.ack)

    async def retry(self, delivery: Delivery, delay: float) -> None:
        job = delivery.job.next_attempt()
        await self._publish_or_requeue(
            delivery.handle, f"schedule the retry of job {job.id}", self._publish_retry(job, delay)
        )
        # Only now: until the wait queue has confirmed the new attempt, the original is
        # the one copy.
        await self.ack(delivery)

    async def _publish_retry(self, job: Job, delay: float) -> None:
        routing_key = self._name if delay <= 0 else await self._declare_wait_queue(delay)
        await self._publish(encode_job(job), routing_key, message_id=job.id)

    async def _declare_wait_queue(self, delay: float) -> str:
        index = bisect.bisect_left(RETRY_LADDER_MS, delay * 1000)
        if index == len(RETRY_LADDER_MS):
            # Early rather than never: a job that cannot be scheduled would come straight
            # back, and hammer the API that asked for the wait.
            index -= 1
            log.warning(
                "a retry delay of %g s is beyond RabbitMQ's wait queues; waiting %g s instead",
                delay,
                RETRY_LADDER_MS[index] / 1000,
            )
        ttl_ms = RETRY_LADDER_MS[index]
        assert self._publisher is not None
        # Declared again in case it was deleted, on the plain underlying channel.
        underlay = await self._publisher.get_underlay_channel()
        wait_queue = f"{self._name}.retry.{ttl_ms}ms"
        await underlay.queue_declare(
            wait_queue, durable=True, arguments=_wait_queue_args(self._name, ttl_ms)
        )
        return wait_queue

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        await self._dead_letter(delivery.handle, reason)

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str) -> None:
        publish = self._publish(
            message.body,
            f"{self._name}.dead",
            message_id=message.message_id,
            headers={REASON_HEADER: reason},
        )
        await self._publish_or_requeue(
            message, f"dead-letter message {message.message_id}", publish
        )
        await self._settle(message, "acknowledge", message.ack)

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
    except MailbenchError:
        await connection.close()
        raise
    return queue


class AmqpDepth:
    """Ready messages of RabbitMQ queues that another client declared (``names``: a
    framework's, the naive mode's), as AMQP reports them
    (a RabbitMQ mailbench started is counted by the harness through the broker itself,
    unacknowledged ones too)."""

    def __init__(self, url: str, names: tuple[str, ...]) -> None:
        self.url = url
        self.names = names
        self._connection: Any = None

    async def depth(self) -> int:
        try:
            if self._connection is None:
                self._connection = await aio_pika.connect_robust(self.url)
            total = 0
            for name in self.names:
                channel = await self._connection.channel()
                try:
                    queue = await channel.declare_queue(name, passive=True)
                    total += int(queue.declaration_result.message_count or 0)
                finally:
                    await channel.close()
            return total
        except (aio_pika.exceptions.AMQPException, OSError) as exc:
            raise QueueError(f"the queue {self.names[0]} could not be counted: {exc!r}") from exc

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
