"""Redis backend on Streams with a consumer group: ``redis://host:port/db``.

Query parameters (removed before the URL reaches redis-py): ``visibility`` — seconds
an unsettled entry of a silent consumer stays claimed before another consumer takes it
over (default 30; live consumers refresh theirs every third of it); ``poll`` — longest
blocking read in seconds (default 1). Parameters of redis-py stay, e.g. ``max_connections``
(pool size, default 50).

Keys: ``mailbench:{name}:jobs`` (stream, group ``workers``; settled entries are
deleted, so its length is the depth), ``…:delayed`` (sorted set of payloads scored by
due time, moved back by consumers) and ``…:dead`` (stream of ``job`` + ``reason``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from queues.base import Delivery, Job, Slots, decode_job, encode_job
from queues.errors import ConfigError, InvalidJob, QueueError, ServiceUnavailable

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


def parse_url(url: str) -> tuple[str, Settings]:
    """Split the mailbench parameters off a ``redis://`` URL."""
    parts = urlsplit(url)
    ours, theirs = {}, []
    for key, value in parse_qsl(parts.query):
        if key in Settings.__dataclass_fields__:
            try:
                ours[key] = float(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r} in the Redis URL is not a number") from None
            if ours[key] <= 0:
                raise ConfigError(f"{key} in the Redis URL must be positive, not {value}")
        else:
            theirs.append((key, value))
    return urlunsplit(parts._replace(query=urlencode(theirs))), Settings(**ours)


def _safe(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host))


@dataclass(frozen=True, slots=True)
class _Handle:
    entry_id: bytes
    slots: Slots


class RedisQueue:
    def __init__(self, url: str, name: str, client: aioredis.Redis, settings: Settings) -> None:
        self._url = url
        self._client = client
        self._settings = settings
        self._jobs = f"mailbench:{{{name}}}:jobs"
        self._delayed = f"mailbench:{{{name}}}:delayed"
        self._dead = f"mailbench:{{{name}}}:dead"
        self._consumer = uuid.uuid4().hex
        self._promote = client.register_script(_PROMOTE)
        self._forget = client.register_script(_FORGET)
        self._in_flight: dict[bytes, Slots] = {}
        self._unyielded: dict[bytes, bytes] = {}  # read, not yet handed out: id -> payload
        self._closed = asyncio.Event()
        self._heartbeat: asyncio.Task[None] | None = None

    async def _start(self) -> None:
        with contextlib.suppress(ResponseError):  # BUSYGROUP: another process made it
            await self._client.xgroup_create(self._jobs, GROUP, id="0", mkstream=True)

    def _fail(self, action: str, exc: BaseException) -> QueueError:
        return QueueError(f"Redis at {self._url} failed to {action}: {exc}")

    async def enqueue(self, job: Job) -> None:
        if self._closed.is_set():
            raise QueueError(f"the Redis queue on {self._url} is closed")
        try:
            await self._client.xadd(self._jobs, {"job": encode_job(job)})
        except RedisError as exc:
            raise self._fail(f"add job {job.id}", exc) from exc

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
                for entry_id, fields in await anext(reader):
                    self._unyielded[entry_id] = (fields or {}).get(b"job", b"")
                    batch.append(entry_id)
                while batch and not self._closed.is_set():  # close() hands them back
                    entry_id = batch.popleft()
                    payload = self._unyielded.pop(entry_id)
                    try:
                        job = decode_job(payload)
                    except InvalidJob as exc:
                        await self._settle(
                            entry_id, self._dead, {"job": payload, "reason": str(exc)}
                        )
                        continue
                    self._in_flight[entry_id] = slots
                    slots.free -= 1
                    yield Delivery(job, _Handle(entry_id, slots))
        except StopAsyncIteration:
            return  # the reader stops when the queue closes
        finally:
            await reader.aclose()
            if batch and not self._closed.is_set():
                await self._hand_back(list(batch))

    async def _reader(self, slots: Slots) -> AsyncGenerator[list[tuple[bytes, Any]], None]:
        """Batches of at most ``slots.free`` entries: overdue entries of dead consumers,
        else new ones; moves due retries into the stream on the way."""
        cursor: bytes | str = "0-0"
        next_upkeep = 0.0
        backoff = 0.0
        while not self._closed.is_set():
            try:
                entries: list[tuple[bytes, Any]] = []
                now = time.time()
                if now >= next_upkeep:
                    next_due = await self._promote(
                        keys=[self._delayed, self._jobs], args=[now, 100]
                    )
                    cursor, entries, *_ = await self._client.xautoclaim(
                        self._jobs,
                        GROUP,
                        self._consumer,
                        int(self._settings.visibility * 1000),
                        start_id=cursor,
                        count=slots.free,
                    )
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
                    entries = reply[0][1] if reply else []
            except (RedisConnectionError, RedisTimeoutError) as exc:
                if self._closed.is_set():
                    return
                # Redis restarting: redis-py reconnects on the next command.
                backoff = min(5.0, backoff * 2 or 0.1)
                log.warning("Redis at %s: %s; trying again in %.1f s", self._url, exc, backoff)
                await self._until_closed(asyncio.sleep(backoff))
                continue
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise self._fail(f"read from {self._jobs}", exc) from exc
                # Restarted without its data: the stream and group must be made again.
                try:
                    await self._start()
                except RedisError as again:
                    raise self._fail(f"recreate group {GROUP}", again) from again
                continue
            except RedisError as exc:
                if self._closed.is_set():
                    return
                raise self._fail(f"read from {self._jobs}", exc) from exc
            backoff = 0.0
            yield entries

    async def _hand_back(self, entry_ids: list[bytes]) -> None:
        """Put entries read but never yielded back as new entries, at once."""
        pipe = self._client.pipeline(transaction=True)
        for entry_id in entry_ids:
            pipe.xadd(self._jobs, {"job": self._unyielded.pop(entry_id, b"")})
            pipe.xack(self._jobs, GROUP, entry_id)
            pipe.xdel(self._jobs, entry_id)
        try:
            await pipe.execute()
        except RedisError as exc:  # they come back after the visibility timeout instead
            log.warning(
                "Redis at %s: handing back %d entries failed: %s", self._url, len(entry_ids), exc
            )

    async def _until_closed(self, aw: Any) -> Any:
        """Await ``aw`` unless the queue closes first (then return ``None``)."""
        task = asyncio.ensure_future(aw)
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait([task, closed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            if not task.done():
                task.cancel()
                # Its connection closes with the queue; that error is of no interest.
                task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task.result() if task.done() else None

    async def _keep_claims(self) -> None:
        # Reset the idle time of our unsettled entries so only a silent consumer's
        # entries age past the visibility timeout (JUSTID leaves the delivery count alone).
        while not self._closed.is_set():
            await asyncio.sleep(self._settings.visibility / 3)
            ids: list[Any] = list(self._in_flight)
            if ids:
                try:
                    await self._client.xclaim(
                        self._jobs, GROUP, self._consumer, 0, ids, justid=True
                    )
                except RedisError as exc:
                    log.warning("Redis at %s: refreshing claims failed: %s", self._url, exc)

    async def _settle(
        self, entry_id: bytes, stream: str | None = None, fields: dict[Any, Any] | None = None
    ) -> None:
        """Remove the entry and, in the same transaction, add ``fields`` to ``stream``."""
        pipe = self._client.pipeline(transaction=True)
        if stream is not None and fields is not None:
            pipe.xadd(stream, fields)
        pipe.xack(self._jobs, GROUP, entry_id)
        pipe.xdel(self._jobs, entry_id)
        try:
            await pipe.execute()
        except RedisError as exc:
            raise self._fail(f"settle entry {entry_id!r}", exc) from exc

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
        try:
            await pipe.execute()
        except RedisError as exc:
            raise self._fail(f"schedule the retry of job {delivery.job.id}", exc) from exc

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        fields = {"job": encode_job(delivery.job), "reason": reason}
        await self._settle(self._release(delivery), self._dead, fields)

    async def depth(self) -> int:
        try:
            pipe = self._client.pipeline(transaction=True)  # atomic with the retry mover
            pipe.xlen(self._jobs)
            pipe.zcard(self._delayed)
            waiting, delayed = await pipe.execute()
        except RedisError as exc:
            raise self._fail("count jobs", exc) from exc
        return int(waiting) + int(delayed)

    async def dead_letters(self) -> int:
        try:
            return int(await self._client.xlen(self._dead))
        except RedisError as exc:
            raise self._fail("count dead letters", exc) from exc

    async def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        if self._unyielded:
            await self._hand_back(list(self._unyielded))
        try:
            if self._heartbeat is not None:
                await self._forget(keys=[self._jobs], args=[GROUP, self._consumer])
        except RedisError as exc:
            log.warning("Redis at %s: removing consumer failed: %s", self._url, exc)
        finally:
            await self._client.aclose()


async def open_redis(url: str, name: str) -> RedisQueue:
    redis_url, settings = parse_url(url)
    # A blocking pool makes a burst of enqueues wait for a connection instead of failing;
    # redis-py reads its size from the URL (``max_connections``, default 50).
    pool = aioredis.BlockingConnectionPool.from_url(redis_url, timeout=20)
    client = aioredis.Redis.from_pool(pool)
    queue = RedisQueue(_safe(url), name, client, settings)
    try:
        await client.ping()
        await queue._start()
    except (RedisError, OSError) as exc:
        await client.aclose()
        raise ServiceUnavailable(f"cannot connect to Redis at {_safe(url)}: {exc}") from exc
    return queue
