"""Amazon SQS backend (aiobotocore): ``sqs://[key:secret@]host:port[/queue]?region=…`` for
an SQS-compatible server such as moto (a fixed dummy key unless the URL has one, never
the machine's AWS credentials), or an AWS queue URL,
``https://sqs.<region>.amazonaws.com/<account>/<queue>``, with the usual credentials
chain. The queue is the URL's path where it has one, else the name the caller gives; a
name ending in ``.fifo`` is a FIFO queue, whose enqueue is deduplicated by the job's id.

Query parameters (besides ``region``): ``visibility`` — seconds a received message stays
hidden (default 30; extended every third of it for the messages a consumer holds);
``poll`` — the long poll's ``WaitTimeSeconds`` (default 1, at most 20);
``max_receives`` — the redrive policy's ``maxReceiveCount`` (default 20).

The dead letter is the redrive target, ``<queue>-dead`` (``…-dead.fifo``), with the
reason in the ``mailbench-reason`` attribute. Retries and hand-backs are new messages:
a retry with ``DelaySeconds`` (a FIFO queue takes none: there it carries its due time,
``mailbench-due``, and is hidden again if received early), a hand-back with the
deliveries made so far (``mailbench-deliveries``), as ``ApproximateReceiveCount`` starts
again with each message. docs/modes.md has the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from queues.base import Delivery, Job, Slots, decode_job, encode_job, until_closed
from queues.errors import ConfigError, InvalidJob, MailbenchError, QueueError, ServiceUnavailable
from queues.urls import redact_url, split_settings

log = logging.getLogger(__name__)

REASON = "mailbench-reason"
CARRIED = "mailbench-deliveries"  # deliveries a hand-back carries over to the new message
DUE = "mailbench-due"  # a FIFO retry's due time (time.time())
DEFAULT_REGION = "us-east-1"
LOCAL_KEY = ("mailbench", "mailbench")  # an SQS-compatible server checks no signature
MAX_DELAY_S = 900  # SendMessage's DelaySeconds and the longest FIFO hide, as SQS allows
MAX_WAIT_S = 20  # ReceiveMessage's WaitTimeSeconds
BATCH = 10  # ReceiveMessage's MaxNumberOfMessages, and the batch calls' entries
_MISSING = {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"}
_DEPTH = (
    "ApproximateNumberOfMessages",
    "ApproximateNumberOfMessagesNotVisible",
    "ApproximateNumberOfMessagesDelayed",
)


@dataclass(frozen=True, slots=True)
class Settings:
    visibility: float = 30.0
    poll: float = 1.0
    max_receives: int = 20


@dataclass(frozen=True, slots=True)
class Target:
    """Where an SQS URL points: ``endpoint`` None for AWS's own."""

    region: str
    queue: str | None
    endpoint: str | None = None
    key: tuple[str, str] | None = None  # None: the AWS credentials chain


def parse_url(url: str) -> tuple[Target, Settings]:
    """Read an ``sqs://`` or AWS ``https://`` queue URL; one sentence for one that cannot
    be used."""
    rest, settings = split_settings(url, Settings(), "SQS")
    parts = urlsplit(rest)
    shown = redact_url(url)
    params = dict(parse_qsl(parts.query))
    region = params.pop("region", None)
    if params:
        raise ConfigError(
            f"the SQS URL {shown} has unknown parameters {', '.join(sorted(params))}; "
            "use region, visibility, poll or max_receives"
        )
    if settings.poll > MAX_WAIT_S or settings.visibility > 43_200:
        raise ConfigError(
            f"the SQS URL {shown} asks too much: poll is at most {MAX_WAIT_S} s and "
            "visibility at most 43200 s"
        )
    path = unquote(parts.path).strip("/")
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"the SQS URL {shown} cannot be used: {exc}") from None
    if parts.scheme == "sqs":
        if not parts.hostname or port is None:
            raise ConfigError(
                f"the SQS URL {shown} names no host and port: use "
                "sqs://127.0.0.1:PORT/QUEUE for a local server, or the https:// URL of an "
                "AWS queue"
            )
        if "/" in path:
            raise ConfigError(f"the SQS URL {shown} has a path of more than one queue name")
        key = (unquote(parts.username), unquote(parts.password or "")) if parts.username else None
        target = Target(
            region or DEFAULT_REGION,
            path or None,
            f"http://{parts.hostname}:{port}",
            key or LOCAL_KEY,
        )
        return target, settings
    host = (parts.hostname or "").split(".")
    account, _, queue = path.partition("/")
    if (
        parts.scheme != "https"
        or len(host) != 4
        or host[0] != "sqs"
        or host[2:] != ["amazonaws", "com"]
        or not account
        or not queue
        or "/" in queue
    ):
        raise ConfigError(
            f"{shown} is no SQS queue URL: use https://sqs.REGION.amazonaws.com/ACCOUNT/QUEUE "
            "or sqs://HOST:PORT/QUEUE for a local server"
        )
    return Target(host[1], queue), settings


@contextlib.contextmanager
def _errors(sentence: str, error: type[MailbenchError] = QueueError) -> Iterator[None]:
    """Where botocore's errors become ours: one raised in the block comes out as
    ``error(f"{sentence}: {exc}")``, caused by it."""
    try:
        yield
    except (BotoCoreError, ClientError, OSError) as exc:
        raise error(f"{sentence}: {exc}") from exc


def _missing(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") in _MISSING


def _number(value: int | float) -> dict[str, str]:
    return {"DataType": "Number", "StringValue": str(value)}


@dataclass(frozen=True, slots=True)
class _Handle:
    receipt: str
    slots: Slots


@dataclass(frozen=True, slots=True)
class _Message:
    """A message as received: ``deliveries`` counts this one."""

    receipt: str
    body: str
    deliveries: int


class SQSQueue:
    def __init__(self, url: str, client: Any, exits: contextlib.AsyncExitStack, settings: Settings):
        self._url = url
        self._client = client
        self._exits = exits
        self._settings = settings
        self._visibility = max(1, math.ceil(settings.visibility))
        self._main = ""
        self._dead = ""
        self._fifo = False
        self._in_flight: dict[str, Slots] = {}
        self._unyielded: dict[str, _Message] = {}  # received, not yet handed out
        self._receives: set[asyncio.Task[list[_Message]]] = set()
        self._closed = asyncio.Event()
        self._heartbeat: asyncio.Task[None] | None = None

    async def _start(self, name: str) -> None:
        """Find or make the queue and its dead letter, with the redrive policy."""
        self._fifo = name.endswith(".fifo")
        fifo = {"FifoQueue": "true"} if self._fifo else {}
        self._main = await self._queue_url(name) or ""
        if self._main:
            attributes = await self._attributes(self._main, ["RedrivePolicy"])
            if "RedrivePolicy" in attributes:
                target = json.loads(attributes["RedrivePolicy"])["deadLetterTargetArn"]
                self._dead = await self._queue_url(target.rpartition(":")[2]) or ""
                if self._dead:
                    return
        dead_name = f"{name.removesuffix('.fifo')}-dead{'.fifo' if self._fifo else ''}"
        self._dead = await self._queue_url(dead_name) or await self._create(dead_name, fifo)
        arn = (await self._attributes(self._dead, ["QueueArn"]))["QueueArn"]
        redrive = {
            "RedrivePolicy": json.dumps(
                {"deadLetterTargetArn": arn, "maxReceiveCount": str(self._settings.max_receives)}
            )
        }
        if self._main:
            await self._client.set_queue_attributes(QueueUrl=self._main, Attributes=redrive)
        else:
            self._main = await self._create(name, fifo | redrive)

    async def _queue_url(self, name: str) -> str | None:
        try:
            reply = await self._client.get_queue_url(QueueName=name)
        except ClientError as exc:
            if _missing(exc):
                return None
            raise
        return str(reply["QueueUrl"])

    async def _create(self, name: str, attributes: dict[str, str]) -> str:
        reply = await self._client.create_queue(QueueName=name, Attributes=attributes)
        return str(reply["QueueUrl"])

    async def _attributes(self, queue_url: str, names: list[str]) -> dict[str, str]:
        reply = await self._client.get_queue_attributes(QueueUrl=queue_url, AttributeNames=names)
        return dict(reply.get("Attributes", {}))

    def _action(self, action: str) -> contextlib.AbstractContextManager[None]:
        return _errors(f"SQS at {self._url} failed to {action}")

    async def _send(
        self,
        queue_url: str,
        body: str,
        job_id: str,
        attributes: dict[str, Any],
        delay: int = 0,
        enqueue: bool = False,
    ) -> None:
        message: dict[str, Any] = {"QueueUrl": queue_url, "MessageBody": body}
        if attributes:
            message["MessageAttributes"] = attributes
        if self._fifo:
            message["MessageGroupId"] = job_id
            # An enqueue deduplicates by the job's id; a message sent again (a retry, a
            # hand-back, a dead letter) is a new one, which SQS would drop for 5 minutes.
            message["MessageDeduplicationId"] = job_id if enqueue else uuid.uuid4().hex
        elif delay:
            message["DelaySeconds"] = delay
        await self._client.send_message(**message)

    async def enqueue(self, job: Job) -> None:
        if self._closed.is_set():
            raise QueueError(f"the SQS queue on {self._url} is closed")
        with self._action(f"send job {job.id}"):
            await self._send(self._main, encode_job(job).decode(), job.id, {}, enqueue=True)

    async def consume(self, prefetch: int) -> AsyncIterator[Delivery]:
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        if self._closed.is_set():
            return
        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._keep_hidden())
        slots = Slots(prefetch, asyncio.Event())
        batch: deque[str] = deque()
        backoff = 0.0
        receiving: asyncio.Task[list[_Message]] | None = None
        try:
            while not self._closed.is_set():
                if slots.free == 0:
                    slots.released.clear()
                    await self._until_closed(slots.released.wait())
                    continue
                receiving = self._receiving(min(BATCH, slots.free))
                try:
                    # Shielded: a receive cut off would leave its messages hidden for the
                    # visibility timeout (the server goes on with a long poll it took).
                    received = await self._until_closed(asyncio.shield(receiving))
                except QueueError as exc:
                    if self._closed.is_set():
                        return
                    backoff = min(5.0, backoff * 2 or 0.1)
                    log.warning("%s; trying again in %.1f s", exc, backoff)
                    await self._until_closed(asyncio.sleep(backoff))
                    continue
                if received is None:  # closed: close() hands back what it brings
                    return
                receiving = None
                backoff = 0.0
                batch.extend(message.receipt for message in received)
                while batch and not self._closed.is_set():  # close() hands them back
                    message = self._unyielded.pop(batch.popleft())
                    try:
                        job = decode_job(message.body)
                    except InvalidJob as exc:
                        with self._action("dead-letter an undecodable message"):
                            await self._move(
                                message.receipt, self._dead, message.body, "", str(exc)
                            )
                        continue
                    self._in_flight[message.receipt] = slots
                    slots.free -= 1
                    yield Delivery(
                        job, _Handle(message.receipt, slots), deliveries=message.deliveries
                    )
        finally:
            if receiving is not None and not self._closed.is_set():
                with contextlib.suppress(QueueError):
                    batch.extend(message.receipt for message in await receiving)
            if batch and not self._closed.is_set():
                await self._hand_back_quietly([self._unyielded.pop(r) for r in batch])

    def _receiving(self, count: int) -> asyncio.Task[list[_Message]]:
        """A receive whose messages are held in ``_unyielded`` until handed out, and
        which :meth:`close` waits for."""

        async def receive() -> list[_Message]:
            messages = await self._receive(count)
            self._unyielded.update((message.receipt, message) for message in messages)
            return messages

        task = asyncio.create_task(receive())
        # Its error reaches the consumer that awaits it; one that closed does not care.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._receives.add(task)
        task.add_done_callback(self._receives.discard)
        return task

    async def _receive(self, count: int) -> list[_Message]:
        with self._action(f"receive from {self._main}"):
            reply = await self._client.receive_message(
                QueueUrl=self._main,
                MaxNumberOfMessages=count,
                WaitTimeSeconds=max(0, round(self._settings.poll)),
                VisibilityTimeout=self._visibility,
                AttributeNames=["ApproximateReceiveCount"],
                MessageAttributeNames=[CARRIED, DUE],
            )
        messages = []
        now = time.time()
        for raw in reply.get("Messages", []):
            attributes = raw.get("MessageAttributes", {})
            due = float(attributes.get(DUE, {}).get("StringValue", 0))
            received = int(raw.get("Attributes", {}).get("ApproximateReceiveCount", 1))
            if due > now:  # a FIFO retry not due yet: hidden again until it is
                hide = min(MAX_DELAY_S, math.ceil(due - now))
                with self._action("hide a retry until it is due"):
                    await self._client.change_message_visibility(
                        QueueUrl=self._main,
                        ReceiptHandle=raw["ReceiptHandle"],
                        VisibilityTimeout=hide,
                    )
                continue
            if due:  # it was received early once, to be hidden: that receive made no delivery
                received = max(1, received - 1)
            carried = int(attributes.get(CARRIED, {}).get("StringValue", 0))
            messages.append(_Message(raw["ReceiptHandle"], raw["Body"], carried + received))
        return messages

    async def _until_closed(self, aw: Any) -> Any:
        return await until_closed(self._closed, aw)

    async def _keep_hidden(self) -> None:
        # Extend the visibility of the messages held (handed out, or received and not yet
        # handed out), so only a silent consumer's come back.
        while not self._closed.is_set():
            await asyncio.sleep(self._settings.visibility / 3)
            receipts = [*self._in_flight, *self._unyielded]
            for start in range(0, len(receipts), BATCH):
                entries = [
                    {"Id": str(n), "ReceiptHandle": r, "VisibilityTimeout": self._visibility}
                    for n, r in enumerate(receipts[start : start + BATCH])
                ]
                try:
                    with self._action("extend the visibility of the messages held"):
                        await self._client.change_message_visibility_batch(
                            QueueUrl=self._main, Entries=entries
                        )
                except QueueError as exc:
                    log.warning("%s", exc)

    async def _move(
        self, receipt: str, queue_url: str, body: str, job_id: str, reason: str = "",
        attributes: dict[str, Any] | None = None, delay: int = 0,
    ) -> None:  # fmt: skip
        """Send ``body`` to ``queue_url``, then delete the message received: at least once."""
        attributes = dict(attributes or {})
        if reason:
            attributes[REASON] = {"DataType": "String", "StringValue": reason}
        await self._send(queue_url, body, job_id or uuid.uuid4().hex, attributes, delay)
        await self._client.delete_message(QueueUrl=self._main, ReceiptHandle=receipt)

    def _release(self, delivery: Delivery) -> str:
        handle: _Handle = delivery.handle
        if self._in_flight.pop(handle.receipt, None) is not None:
            handle.slots.release()
        return handle.receipt

    async def ack(self, delivery: Delivery) -> None:
        receipt = self._release(delivery)
        with self._action(f"delete job {delivery.job.id}"):
            try:
                await self._client.delete_message(QueueUrl=self._main, ReceiptHandle=receipt)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "ReceiptHandleIsInvalid":
                    raise
                # Its visibility ran out and another consumer took the message and
                # deleted it: the job is done (twice, which the ledger shows).
                log.warning("job %s was deleted by another consumer: %s", delivery.job.id, exc)

    async def retry(self, delivery: Delivery, delay: float) -> None:
        receipt = self._release(delivery)
        job = delivery.job.next_attempt()
        seconds = min(MAX_DELAY_S, math.ceil(max(0.0, delay)))
        attributes = {DUE: _number(time.time() + delay)} if self._fifo and delay > 0 else {}
        with self._action(f"schedule the retry of job {job.id}"):
            await self._move(
                receipt, self._main, encode_job(job).decode(), job.id,
                attributes=attributes,
                delay=seconds,
            )  # fmt: skip

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        receipt = self._release(delivery)
        job = delivery.job
        with self._action(f"dead-letter job {job.id}"):
            await self._move(receipt, self._dead, encode_job(job).decode(), job.id, reason)

    async def hand_back(self, delivery: Delivery) -> None:
        receipt = self._release(delivery)
        body = encode_job(delivery.job).decode()
        with self._action(f"hand back job {delivery.job.id}"):
            await self._hand_back([_Message(receipt, body, delivery.deliveries)])

    async def _hand_back(self, messages: list[_Message]) -> None:
        """Send messages never started again, at once, carrying the deliveries made
        before this one; then delete the ones received."""
        for message in messages:
            carried = {CARRIED: _number(message.deliveries - 1)}
            job_id = _job_id(message.body)
            await self._move(message.receipt, self._main, message.body, job_id, attributes=carried)

    async def _hand_back_quietly(self, messages: list[_Message]) -> None:
        try:
            with self._action(f"hand back {len(messages)} messages"):
                await self._hand_back(messages)
        except QueueError as exc:
            log.warning("%s; they come back after the visibility timeout", exc)

    async def depth(self) -> int:
        """Messages visible, received and not yet deleted, and delayed (retries)."""
        with self._action("count messages"):
            counts = await self._attributes(self._main, list(_DEPTH))
        return sum(int(counts.get(name, 0)) for name in _DEPTH)

    async def dead_letters(self) -> int:
        with self._action("count dead letters"):
            counts = await self._attributes(self._dead, list(_DEPTH))
        return sum(int(counts.get(name, 0)) for name in _DEPTH)

    async def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        if self._receives:  # a long poll ends within poll seconds
            await asyncio.wait(self._receives, timeout=self._settings.poll + 10)
        if self._unyielded:
            await self._hand_back_quietly(list(self._unyielded.values()))
            self._unyielded.clear()
        await self._exits.aclose()


def _job_id(body: str) -> str:
    try:
        return decode_job(body).id
    except InvalidJob:
        return uuid.uuid4().hex


async def open_sqs(url: str, name: str) -> SQSQueue:
    target, settings = parse_url(url)
    shown = redact_url(url)
    config = AioConfig(
        connect_timeout=10,
        read_timeout=MAX_WAIT_S + 10,  # above the long poll
        retries={"max_attempts": 3, "mode": "standard"},
        max_pool_connections=20,  # requests in flight at once; more only crowd moto's threads
    )
    options: dict[str, Any] = {"region_name": target.region, "config": config}
    if target.endpoint is not None:
        options["endpoint_url"] = target.endpoint
    if target.key is not None:
        options["aws_access_key_id"], options["aws_secret_access_key"] = target.key
    exits = contextlib.AsyncExitStack()
    with _errors(f"cannot connect to SQS at {shown}", ServiceUnavailable):
        client = await exits.enter_async_context(get_session().create_client("sqs", **options))
    queue = SQSQueue(shown, client, exits, settings)
    try:
        with _errors(f"cannot connect to SQS at {shown}", ServiceUnavailable):
            await queue._start(target.queue or name)
    except BaseException:
        await exits.aclose()
        raise
    return queue
