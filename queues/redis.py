"""Redis backend on Streams with a consumer group: ``redis://host:port/db``.

Query parameters (removed before the URL reaches redis-py): ``visibility`` — seconds
an unsettled entry of a silent consumer stays claimed before another consumer takes it
over (default 30; live consumers refresh theirs every third of it); ``poll`` — longest
blocking read in seconds (default 1); ``connection_wait`` — longest wait in seconds for
one of the pool's connections (default 20). Parameters of redis-py stay, e.g.
``max_connections`` (pool size, default 50).

A burst of more commands than connections (a server's enqueues, a worker's acks) waits
for a connection in arrival order. redis-py's own blocking pool wakes waiters through a
condition that the task just releasing a connection wins again, so under a sustained
burst a waiter starved until its timeout ("No connection available").

Keys: ``mailbench:{name}:jobs`` (stream, group ``workers``; settled entries are
deleted, so its length is the depth; an entry handed back carries the deliveries it
had made in a ``d`` field), ``…:delayed`` (sorted set of payloads scored by due time,
moved back by consumers) and ``…:dead`` (stream of ``job`` + ``reason``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from queues.base import Delivery, Job, Slots, decode_job, encode_job, until_closed
from queues.errors import ConfigError, InvalidJob, MailbenchError, QueueError, ServiceUnavailable
from queues.urls import redact_url, split_settings

log = logging.getLogger(__name__)

GROUP = "workers"
# Moves due delayed jobs back into the stream in one step, so two consumers never both
# move the same one; returns the earliest remaining due time ("" when none).
_PROMOTE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, payload in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', 'job', payload)
  redis.call('ZREM', KEYS[1], payload)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #nxt == 0 then return '' end
return nxt[2]
"""
# Forgets a consumer that holds no entries (deleting one with pending entries loses them).
_FORGET = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
  return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return -1
"""


@dataclass(frozen=True, slots=True)
class Settings:
    visibility: float = 30.0
    poll: float = 1.0
    connection_wait: float = 20.0


@contextlib.contextmanager
def _errors(sentence: str, error: type[MailbenchError] = QueueError) -> Iterator[None]:
    """Where redis-py's errors become ours: one raised in the block comes out as
    ``error(f"{sentence}: {exc}")``, caused by it."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise error(f"{sentence}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class _Handle:
    entry_id: bytes
    slots: Slots


@dataclass(frozen=True, slots=True)
class _Entry:
    """A stream entry as read: ``deliveries`` counts this one."""

    entry_id: bytes
    payload: bytes
    deliveries: int


def _entry(entry_id: bytes, fields: dict[bytes, bytes] | None, delivered: int) -> _Entry:
    """``delivered``: the stream's count for the entry (1 when read new); a hand-back
    carried the earlier ones over in ``d``."""
    fields = fields or {}
    return _Entry(entry_id, fields.get(b"job", b""), int(fields.get(b"d", 0)) + delivered)


class RedisQueue:
    def __init__(
        self, url: str, name: str, client: aioredis.Redis, settings: Settings, connections: int
    ) -> None:
        self._url = url
        self._client = client
        self._settings = settings
        self._connections = connections
        # First come, first served (asyncio's semaphore is fair): see the module's doc.
        self._gate = asyncio.Semaphore(connections)
        self._jobs = f"mailbench:{{{name}}}:jobs"
        self._delayed = f"mailbench:{{{name}}}:delayed"
        self._dead = f"mailbench:{{{name}}}:dead"
        self._consumer = uuid.uuid4().hex
        self._promote = client.register_script(_PROMOTE)
        self._forget = client.register_script(_FORGET)
        self._in_flight: dict[bytes, Slots] = {}
        self._unyielded: dict[bytes, _Entry] = {}  # read, not yet handed out
        self._closed = asyncio.Event()
        self._heartbeat: asyncio.Task[None] | None = None

    async def _start(self) -> None:
        with contextlib.suppress(ResponseError):  # BUSYGROUP: another process made it
            await self._client.xgroup_create(self._jobs, GROUP, id="0", mkstream=True)

    @contextlib.asynccontextmanager
    async def _turn(self, action: str) -> AsyncIterator[None]:
        """A connection of the pool for ``action``, in arrival order, waited for
        ``connection_wait`` seconds at most; redis-py's errors in the block become ours."""
        sentence = f"Redis at {self._url} failed to {action}"
        wait = self._settings.connection_wait
        try:
            async with asyncio.timeout(wait):
                await self._gate.acquire()
        except TimeoutError:
            raise QueueError(
                f"{sentence}: all {self._connections} connections stayed busy for {wait:g} s"
                " (raise max_connections or connection_wait in the URL)"
            ) from None
        try:
            with _errors(sentence):
                yield
        finally:
            self._gate.release()

    async def enqueue(self, job: Job) -> None:
        if self._closed.is_set():
            raise QueueError(f"the Redis queue on {self._url} is closed")
        async with self._turn(f"add job {job.id}"):
            await self._client.xadd(self._jobs, {"job": encode_job(job)})

    async def consume(self, prefetch: int) -> AsyncIterator[Delivery]:
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        if self._closed.is_set():
            return
        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._keep_claims())
        slots = Slots(prefetch, asyncio.Event())
        reader = self._reader(slots)
        batch: deque[bytes] = deque()
        try:
            while not self._closed.is_set():
                if slots.free == 0:
                    slots.released.clear()
                    await self._until_closed(slots.released.wait())
                    continue
                for entry in await anext(reader):
                    self._unyielded[entry.entry_id] = entry
                    batch.append(entry.entry_id)
                while batch and not self._closed.is_set():  # close() hands them back
                    entry = self._unyielded.pop(batch.popleft())
                    try:
                        job = decode_job(entry.payload)
                    except InvalidJob as exc:
                        fields = {"job": entry.payload, "reason": str(exc)}
                        await self._settle(entry.entry_id, self._dead, fields)
                        continue
                    self._in_flight[entry.entry_id] = slots
                    slots.free -= 1
                    handle = _Handle(entry.entry_id, slots)
                    yield Delivery(job, handle, deliveries=entry.deliveries)
        except StopAsyncIteration:
            return  # the reader stops when the queue closes
        finally:
            await reader.aclose()
            if batch and not self._closed.is_set():
                await self._hand_back_unyielded(list(batch))

    async def _reader(self, slots: Slots) -> AsyncGenerator[list[_Entry], None]:
        """Batches of at most ``slots.free`` entries: overdue entries of dead consumers,
        else new ones; moves due retries into the stream on the way."""
        cursor: bytes | str = "0-0"
        next_upkeep = 0.0
        backoff = 0.0
        while not self._closed.is_set():
            try:
                async with self._turn(f"read from {self._jobs}"):
                    cursor, entries, next_upkeep = await self._read(slots, cursor, next_upkeep)
            except QueueError as exc:
                cause = exc.__cause__
                if isinstance(cause, ResponseError) and "NOGROUP" in str(cause):
                    # Restarted without its data: the stream and group must be made again.
                    async with self._turn(f"recreate group {GROUP}"):
                        await self._start()
                    continue
                if self._closed.is_set() and not isinstance(cause, ResponseError):
                    return
                if not isinstance(cause, RedisConnectionError | RedisTimeoutError):
                    raise
                # Redis restarting: redis-py reconnects on the next command.
                backoff = min(5.0, backoff * 2 or 0.1)
                log.warning("%s; trying again in %.1f s", exc, backoff)
                await self._until_closed(asyncio.sleep(backoff))
                continue
            backoff = 0.0
            yield entries

    async def _read(
        self, slots: Slots, cursor: bytes | str, next_upkeep: float
    ) -> tuple[bytes | str, list[_Entry], float]:
        """One batch for :meth:`_reader`, with the cursor and upkeep time to go on with."""
        entries: list[_Entry] = []
        now = time.time()
        if now >= next_upkeep:
            next_due = await self._promote(keys=[self._delayed, self._jobs], args=[now, 100])
            cursor, claimed, *_ = await self._client.xautoclaim(
                self._jobs,
                GROUP,
                self._consumer,
                int(self._settings.visibility * 1000),
                start_id=cursor,
                count=slots.free,
            )
            entries = await self._with_delivery_counts(claimed)
            next_upkeep = now + min(self._settings.poll, self._settings.visibility / 3)
            if next_due:
                next_upkeep = min(next_upkeep, float(next_due))
        if not entries:
            block = max(1, int((next_upkeep - time.time()) * 1000))
            reply = await self._until_closed(
                self._client.xreadgroup(
                    GROUP, self._consumer, {self._jobs: ">"}, count=slots.free, block=block
                )
            )
            entries = (
                [_entry(entry_id, fields, 1) for entry_id, fields in reply[0][1]] if reply else []
            )
        return cursor, entries, next_upkeep

    async def _with_delivery_counts(self, claimed: list[tuple[bytes, Any]]) -> list[_Entry]:
        """Entries taken over from a silent consumer, with their delivery counts (the
        claim counted one more). Rare: only a dead or stalled consumer leaves any."""
        if not claimed:
            return []
        pipe = self._client.pipeline(transaction=False)
        for entry_id, _ in claimed:
            pipe.xpending_range(self._jobs, GROUP, min=entry_id, max=entry_id, count=1)
        counts = await pipe.execute()
        return [
            # No pending entry left: another consumer settled it meanwhile (counted as 1).
            _entry(entry_id, fields, int(pending[0]["times_delivered"]) if pending else 1)
            for (entry_id, fields), pending in zip(claimed, counts, strict=True)
        ]

    async def _hand_back(self, entries: list[_Entry]) -> None:
        """Put entries never started back as new entries, at once, carrying the
        deliveries made before this one."""
        pipe = self._client.pipeline(transaction=True)
        for entry in entries:
            fields: dict[str, bytes | int] = {"job": entry.payload}
            if entry.deliveries > 1:
                fields["d"] = entry.deliveries - 1
            pipe.xadd(self._jobs, fields)  # type: ignore[arg-type]
            pipe.xack(self._jobs, GROUP, entry.entry_id)
            pipe.xdel(self._jobs, entry.entry_id)
        async with self._turn(f"hand back {len(entries)} entries"):
            await pipe.execute()

    async def _hand_back_unyielded(self, entry_ids: list[bytes]) -> None:
        entries = [self._unyielded.pop(entry_id) for entry_id in entry_ids]
        try:
            await self._hand_back(entries)
        except QueueError as exc:
            log.warning("%s; they come back after the visibility timeout", exc)

    async def _until_closed(self, aw: Any) -> Any:
        return await until_closed(self._closed, aw)

    async def _keep_claims(self) -> None:
        # Reset the idle time of our unsettled entries so only a silent consumer's
        # entries age past the visibility timeout (JUSTID leaves the delivery count alone).
        while not self._closed.is_set():
            await asyncio.sleep(self._settings.visibility / 3)
            ids: list[Any] = list(self._in_flight)
            if ids:
                try:
                    async with self._turn("refresh claims"):
                        await self._client.xclaim(
                            self._jobs, GROUP, self._consumer, 0, ids, justid=True
                        )
                except QueueError as exc:
                    log.warning("%s", exc)

    async def _settle(
        self, entry_id: bytes, stream: str | None = None, fields: dict[Any, Any] | None = None
    ) -> None:
        """Remove the entry and, in the same transaction, add ``fields`` to ``stream``."""
        pipe = self._client.pipeline(transaction=True)
        if stream is not None and fields is not None:
            pipe.xadd(stream, fields)
        pipe.xack(self._jobs, GROUP, entry_id)
        pipe.xdel(self._jobs, entry_id)
        async with self._turn(f"settle entry {entry_id!r}"):
            await pipe.execute()

    def _release(self, delivery: Delivery) -> bytes:
        handle: _Handle = delivery.handle
        if self._in_flight.pop(handle.entry_id, None) is not None:
            handle.slots.release()
        return handle.entry_id

    async def ack(self, delivery: Delivery) -> None:
        await self._settle(self._release(delivery))

    async def retry(self, delivery: Delivery, delay: float) -> None:
        entry_id = self._release(delivery)
        payload = encode_job(delivery.job.next_attempt())
        if delay <= 0:
            await self._settle(entry_id, self._jobs, {"job": payload})
            return
        pipe = self._client.pipeline(transaction=True)
        pipe.zadd(self._delayed, {payload: time.time() + delay})
        pipe.xack(self._jobs, GROUP, entry_id)
        pipe.xdel(self._jobs, entry_id)
        async with self._turn(f"schedule the retry of job {delivery.job.id}"):
            await pipe.execute()

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        fields = {"job": encode_job(delivery.job), "reason": reason}
        await self._settle(self._release(delivery), self._dead, fields)

    async def hand_back(self, delivery: Delivery) -> None:
        entry_id = self._release(delivery)
        await self._hand_back([_Entry(entry_id, encode_job(delivery.job), delivery.deliveries)])

    async def depth(self) -> int:
        """Stream entries (waiting, or delivered to any consumer and not yet settled)
        plus the retries in the delayed set."""
        async with self._turn("count jobs"):
            pipe = self._client.pipeline(transaction=True)  # atomic with the retry mover
            pipe.xlen(self._jobs)
            pipe.zcard(self._delayed)
            waiting, delayed = await pipe.execute()
        return int(waiting) + int(delayed)

    async def dead_letters(self) -> int:
        async with self._turn("count dead letters"):
            return int(await self._client.xlen(self._dead))

    async def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        if self._unyielded:
            await self._hand_back_unyielded(list(self._unyielded))
        try:
            if self._heartbeat is not None:
                async with self._turn(f"remove consumer {self._consumer}"):
                    await self._forget(keys=[self._jobs], args=[GROUP, self._consumer])
        except QueueError as exc:
            log.warning("%s", exc)
        finally:
            await self._client.aclose()


async def open_redis(url: str, name: str) -> RedisQueue:
    redis_url, settings = split_settings(url, Settings(), "Redis")
    shown = redact_url(url)
    # redis-py reads the pool's size from the URL (``max_connections``, default 50). The
    # queue's gate lets no more commands at it than that, so only the two commands of
    # opening could ever wait in the pool itself; it blocks rather than fails all the same.
    try:
        pool = aioredis.BlockingConnectionPool.from_url(redis_url, timeout=settings.connection_wait)
    except ValueError as exc:  # a port or parameter that does not parse
        raise ConfigError(f"the Redis URL {shown} cannot be used: {exc}") from exc
    client = aioredis.Redis.from_pool(pool)
    queue = RedisQueue(shown, name, client, settings, pool.max_connections)
    try:
        with _errors(f"cannot connect to Redis at {shown}", ServiceUnavailable):
            await client.ping()
            await queue._start()
    except ServiceUnavailable:
        await client.aclose()
        raise
    return queue
