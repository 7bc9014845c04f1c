"""In-process queue for tests and demos: ``memory://`` or ``memory://space``.

Queue objects opened with the same space and name share one store, so a server and a
worker in one process (or a test and either) see the same jobs. Unsettled deliveries
go back to the queue when their queue object is closed or on :meth:`requeue_unacked`,
which is how a test simulates a consumer crash; either counts as a delivery made.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from queues.base import Delivery, Job, decode_job, encode_job
from queues.errors import InvalidJob, QueueError


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A dead-lettered payload; ``job`` is ``None`` when the payload did not decode."""

    payload: bytes
    reason: str
    job: Job | None


@dataclass(frozen=True, slots=True)
class _Entry:
    payload: bytes
    delivered: int = 0  # times handed out before, for Delivery.deliveries


@dataclass(slots=True)
class _Store:
    ready: deque[_Entry] = field(default_factory=deque)
    delayed: list[tuple[float, int, _Entry]] = field(default_factory=list)
    in_flight: dict[int, _Entry] = field(default_factory=dict)
    dead: list[DeadLetter] = field(default_factory=list)
    waiters: set[asyncio.Future[None]] = field(default_factory=set)

    def wake(self) -> None:
        for waiter in self.waiters:
            # A waiter from an event loop that is already gone (an earlier test) is skipped.
            if not waiter.done() and not waiter.get_loop().is_closed():
                waiter.set_result(None)

    def promote_due(self, now: float) -> float | None:
        """Move due delayed jobs to ``ready``; return the next due time, if any."""
        while self.delayed and self.delayed[0][0] <= now:
            self.ready.append(heapq.heappop(self.delayed)[2])
        return self.delayed[0][0] if self.delayed else None


_STORES: dict[tuple[str, str], _Store] = {}
_TAGS = itertools.count(1)
_SEQ = itertools.count()


def reset_memory() -> None:
    """Forget every in-memory queue (for test isolation)."""
    _STORES.clear()


@dataclass(slots=True)
class _Slots:
    free: int
    waiter: asyncio.Future[None] | None = None

    def release(self) -> None:
        self.free += 1
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


@dataclass(frozen=True, slots=True)
class _Handle:
    tag: int
    slots: _Slots


class MemoryQueue:
    def __init__(self, store: _Store) -> None:
        self._store = store
        self._unacked: dict[int, _Slots] = {}
        self._closed = False

    async def enqueue(self, job: Job) -> None:
        self.put_raw(encode_job(job))

    def put_raw(self, payload: bytes) -> None:
        """Append ``payload`` as is, e.g. a poison message in a test."""
        self._check_open()
        self._store.ready.append(_Entry(payload))
        self._store.wake()

    async def consume(self, prefetch: int) -> AsyncIterator[Delivery]:
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        slots = _Slots(prefetch)
        store = self._store
        loop = asyncio.get_running_loop()
        while not self._closed:
            if slots.free == 0:
                slots.waiter = loop.create_future()
                await slots.waiter
                continue
            next_due = store.promote_due(time.monotonic())
            if not store.ready:
                waiter = loop.create_future()
                store.waiters.add(waiter)
                try:
                    timeout = None if next_due is None else next_due - time.monotonic()
                    await asyncio.wait([waiter], timeout=timeout)
                finally:
                    store.waiters.discard(waiter)
                continue
            entry = store.ready.popleft()
            try:
                job = decode_job(entry.payload)
            except InvalidJob as exc:
                store.dead.append(DeadLetter(entry.payload, str(exc), None))
                continue
            tag = next(_TAGS)
            store.in_flight[tag] = entry
            self._unacked[tag] = slots
            slots.free -= 1
            yield Delivery(job, _Handle(tag, slots), deliveries=entry.delivered + 1)

    def _settle(self, delivery: Delivery) -> _Entry:
        handle = delivery.handle
        if not isinstance(handle, _Handle) or handle.tag not in self._unacked:
            raise QueueError(
                f"delivery of job {delivery.job.id} is not in flight on this queue: it was "
                "settled already, or put back when the queue was closed"
            )
        del self._unacked[handle.tag]
        handle.slots.release()
        return self._store.in_flight.pop(handle.tag)

    async def ack(self, delivery: Delivery) -> None:
        self._settle(delivery)

    async def retry(self, delivery: Delivery, delay: float) -> None:
        self._settle(delivery)
        entry = _Entry(encode_job(delivery.job.next_attempt()))
        if delay <= 0:
            self._store.ready.append(entry)
        else:
            due = time.monotonic() + delay
            heapq.heappush(self._store.delayed, (due, next(_SEQ), entry))
        self._store.wake()

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        entry = self._settle(delivery)
        self._store.dead.append(DeadLetter(entry.payload, reason, delivery.job))

    async def hand_back(self, delivery: Delivery) -> None:
        # Not counted: the entry goes back with the count it had before this delivery.
        self._store.ready.append(self._settle(delivery))
        self._store.wake()

    async def depth(self) -> int:
        """Ready, delayed and in flight, of every consumer of the store."""
        store = self._store
        return len(store.ready) + len(store.delayed) + len(store.in_flight)

    async def dead_letters(self) -> int:
        return len(self._store.dead)

    def dead_lettered(self) -> list[DeadLetter]:
        """The dead letters of this queue with their reasons, oldest first."""
        return list(self._store.dead)

    def requeue_unacked(self) -> int:
        """Put this queue object's unsettled deliveries back, as if its consumer died."""
        tags = list(self._unacked)
        for tag in tags:
            self._unacked.pop(tag).release()
            entry = self._store.in_flight.pop(tag)
            self._store.ready.append(_Entry(entry.payload, entry.delivered + 1))
        self._store.wake()
        return len(tags)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.requeue_unacked()

    def _check_open(self) -> None:
        if self._closed:
            raise QueueError("the memory queue is closed")


async def open_memory(url: str, name: str) -> MemoryQueue:
    space = urlsplit(url).netloc or "default"
    store = _STORES.setdefault((space, name), _Store())
    return MemoryQueue(store)
