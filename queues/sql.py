"""What the SQL backends (:mod:`queues.sqlite`, :mod:`queues.postgres`) share.

Both keep every queue in one ``mailbench_jobs`` table. A row is ``available`` (claimable
once ``run_at`` has passed), ``running`` (leased to ``locked_by`` until
``locked_until``) or ``dead`` (with ``reason``); an ack deletes it. ``deliveries`` counts
the claims of the row's current attempt (a retry sets it to 0, a hand-back takes its own
claim back), so a row rescued from expired leases again and again shows it. A consumer
claims a batch by setting a lease and commits at once; every write that settles a row is fenced
by ``locked_by``, so a consumer whose lease was rescued cannot settle someone else's
claim. While it runs, a consumer extends its own leases every third of the lease and
makes expired leases available again (a dead consumer's, or a claim whose reply was lost).

URL query parameters (:func:`queues.urls.split_settings`): ``lease`` (seconds, default
30) and ``poll`` (seconds between looks at an idle table).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from queues.base import Delivery, Slots, decode_job
from queues.errors import InvalidJob, QueueError

log = logging.getLogger(__name__)

TABLE = "mailbench_jobs"


@dataclass(frozen=True, slots=True)
class Settings:
    lease: float = 30.0
    poll: float = 1.0


@dataclass(frozen=True, slots=True)
class _Handle:
    row_id: int
    slots: Slots


class LeasedQueue(ABC):
    """The consumer side of a lease-based table queue; subclasses run the statements."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.consumer_id = uuid.uuid4().hex
        self._in_flight: dict[int, Slots] = {}
        self._unyielded: set[int] = set()
        self._wakeup = asyncio.Event()
        self._closed = asyncio.Event()
        self._upkeep: asyncio.Task[None] | None = None

    async def _prepare_consumer(self) -> None:
        """Called before the first claim of every consumer."""
        return None

    def _is_transient(self, error: BaseException | None) -> bool:
        """Whether a failed claim is worth trying again (the database restarting, say)."""
        return False

    @abstractmethod
    async def _claim(self, limit: int) -> list[tuple[int, bytes, int]]:
        """Lease up to ``limit`` due rows to this consumer, counting a delivery of each;
        return ``(id, payload, deliveries)``."""

    @abstractmethod
    async def _seconds_to_next_due(self) -> float | None:
        """Seconds until the earliest ``available`` row is due, ``None`` when none waits."""

    @abstractmethod
    async def _extend_and_rescue(self, held: list[int]) -> None:
        """Extend the leases of the rows in ``held`` (fenced); make expired leases
        available. Only rows we know we hold: a claim whose reply was lost with the
        connection must expire like a dead consumer's."""

    @abstractmethod
    async def _unclaim(self, row_ids: list[int]) -> None:
        """Make rows claimed but never started available again at once, taking back the
        delivery their claim counted (fenced)."""

    @abstractmethod
    async def _bury(self, row_id: int, reason: str) -> None:
        """Dead-letter a row that this consumer holds (fenced)."""

    async def consume(self, prefetch: int) -> AsyncIterator[Delivery]:
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        if self._closed.is_set():
            return
        await self._prepare_consumer()
        if self._upkeep is None:
            self._upkeep = asyncio.create_task(self._keep_leases())
        slots = Slots(prefetch, asyncio.Event())
        batch: deque[tuple[int, bytes, int]] = deque()
        backoff = 0.0
        try:
            while not self._closed.is_set():
                if slots.free == 0:
                    slots.released.clear()
                    await self._wait(slots.released, None)
                    continue
                self._wakeup.clear()
                try:
                    batch.extend(await self._claim(slots.free))
                    due = None if batch else await self._seconds_to_next_due()
                except QueueError as exc:
                    if self._closed.is_set():
                        return
                    if not self._is_transient(exc.__cause__):
                        raise
                    backoff = min(5.0, backoff * 2 or 0.1)
                    log.warning("%s; trying again in %.1f s", exc, backoff)
                    await self._wait(self._closed, backoff)
                    continue
                backoff = 0.0
                if not batch:
                    poll = self.settings.poll
                    await self._wait(self._wakeup, poll if due is None else min(poll, due))
                    continue
                self._unyielded.update(row_id for row_id, _, _ in batch)
                while batch and not self._closed.is_set():  # close() hands them back
                    row_id, payload, deliveries = batch.popleft()
                    self._unyielded.discard(row_id)
                    try:
                        job = decode_job(payload)
                    except InvalidJob as exc:
                        await self._bury(row_id, str(exc))
                        continue
                    self._in_flight[row_id] = slots
                    slots.free -= 1
                    yield Delivery(job, _Handle(row_id, slots), deliveries=deliveries)
        finally:
            if batch and not self._closed.is_set():
                left = [row_id for row_id, _, _ in batch]
                self._unyielded.difference_update(left)
                try:
                    await self._give_back(left)
                except QueueError as exc:  # their leases expire instead
                    log.warning("handing back %d unstarted jobs failed: %s", len(left), exc)

    async def _wait(self, event: asyncio.Event, timeout: float | None) -> None:
        waits = {asyncio.ensure_future(event.wait()), asyncio.ensure_future(self._closed.wait())}
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()

    async def _keep_leases(self) -> None:
        while not self._closed.is_set():
            try:
                await self._extend_and_rescue([*self._in_flight, *self._unyielded])
            except Exception as exc:  # the next round may work; the lease is long enough
                log.warning("keeping leases failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), self.settings.lease / 3)

    async def hand_back(self, delivery: Delivery) -> None:
        await self._give_back([self._release(delivery.handle)])

    async def _give_back(self, row_ids: list[int]) -> None:
        await self._unclaim(row_ids)
        self._announce()

    def _announce(self) -> None:
        """Rows became available: wake the consumers that may be waiting for them."""
        self._wakeup.set()

    def _release(self, handle: _Handle) -> int:
        if self._in_flight.pop(handle.row_id, None) is not None:
            handle.slots.release()
        return handle.row_id

    def _lease_lost(self, row_id: int, action: str) -> None:
        log.warning(
            "could not %s row %d: its lease expired and another consumer took it over",
            action,
            row_id,
        )

    async def _stop_consuming(self) -> None:
        """Stop the generators and the lease keeper; hand back rows never yielded."""
        self._closed.set()
        if self._upkeep is not None:
            self._upkeep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._upkeep
        if self._unyielded:
            with contextlib.suppress(Exception):
                await self._give_back(list(self._unyielded))
            self._unyielded.clear()
