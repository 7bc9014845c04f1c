"""The job and the queue contract that every backend implements.

A web handler turns a valid form into a :class:`Job` and hands it to a :class:`Queue`;
a worker consumes :class:`Delivery` objects, calls the email API, then settles each
delivery exactly once with :meth:`Queue.ack`, :meth:`Queue.retry` or
:meth:`Queue.dead_letter`.

Guarantees every backend gives (the contract tests in ``tests/`` check each one):

* **Durable enqueue.** ``enqueue`` returns only once the broker has durably accepted the
  job — a publisher confirm (RabbitMQ), a command reply with AOF on (Redis), a committed
  transaction (SQLite, PostgreSQL). A 2xx from ``POST /send`` rests on this promise.
* **At-least-once delivery.** A delivery that is not settled — its consumer crashed,
  lost its connection, or its lease expired — is delivered again. Jobs are therefore
  idempotent by their ``id``, which is sent to the email API as the idempotency key.
* **No ordering.** Consumers must not assume FIFO; retries and redeliveries reorder.
* **Settle once.** After ``ack``, ``retry``, ``dead_letter`` or ``hand_back`` the
  delivery is done with; ``retry`` makes the job (with ``attempt`` increased by one)
  visible again after ``delay`` seconds; ``dead_letter`` keeps it with the reason for a
  human to inspect; ``hand_back`` returns a delivery its consumer never started, at
  once and as if it had never been handed out (neither ``attempt`` nor ``deliveries``
  grows), so a consumer that stops gives its backlog to the others without waiting
  out a lease.
* **Deliveries are counted.** :attr:`Delivery.deliveries` says how often the broker has
  handed the job's current attempt out: 1, plus one per redelivery after a crash, a
  lost connection or an expired lease. A job that kills every consumer it reaches
  (a *poison job*) shows itself by a growing count although it never gets as far as an
  API call, which is how a worker can dead-letter it (``servers/worker.py``). A retry
  is a new attempt and counts from 1 again.
* **Poison messages never block the queue.** A payload that does not decode into a job
  is dead-lettered by the backend itself with the decoding error as reason, and
  ``consume`` goes on with the next one.
* ``depth`` counts jobs still to be sent — waiting, waiting out a retry's delay, or
  claimed and not yet settled — never dead letters; it reaches 0 when the queue is
  drained. One backend sees less: RabbitMQ reports no other consumer's unacknowledged
  messages over AMQP (see :meth:`Queue.depth`).

Backends are chosen by URL scheme, see :func:`queues.open_queue`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from queues.errors import InvalidJob

JOB_FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class Email:
    """One message as the reference server accepted it from the form."""

    to: str
    subject: str
    text: str
    sender: str = "mailbench <bench@mailbench.test>"


@dataclass(frozen=True, slots=True)
class Job:
    """A unit of work: send :attr:`email` once.

    ``id`` is the idempotency key given to the email API, so a job delivered twice is
    detectable in the fake Mailgun's ledger. ``enqueued_at`` is the wall-clock time
    (``time.time()``) at which the server accepted the job; queue wait and delivery lag
    are measured from it. ``attempt`` counts API calls already made for this job.
    """

    id: str
    email: Email
    enqueued_at: float = field(default_factory=time.time)
    attempt: int = 0

    def next_attempt(self) -> Job:
        return replace(self, attempt=self.attempt + 1)


@dataclass(slots=True)
class Slots:
    """Room for more unsettled deliveries: a consumer holding ``prefetch`` at most takes
    one slot per delivery and a settle gives it back (a helper shared by backends)."""

    free: int
    released: asyncio.Event

    def release(self) -> None:
        self.free += 1
        self.released.set()


async def until_closed(closed: asyncio.Event, aw: Any) -> Any:
    """Await ``aw`` unless ``closed`` is set first, then cancel it and return ``None``
    (a helper shared by backends whose consumers wait on the broker)."""
    task = asyncio.ensure_future(aw)
    closing = asyncio.ensure_future(closed.wait())
    try:
        await asyncio.wait([task, closing], return_when=asyncio.FIRST_COMPLETED)
    finally:
        closing.cancel()
        # Read before the cancel: a future (a shield) is done as soon as it is cancelled.
        cut_off = not task.done()
        if cut_off:
            task.cancel()
            # Its connection closes with the queue; that error is of no interest.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return None if cut_off else task.result()


def encode_job(job: Job) -> bytes:
    """The one wire format shared by every backend: compact UTF-8 JSON."""
    payload = {
        "v": JOB_FORMAT_VERSION,
        "id": job.id,
        "enqueued_at": job.enqueued_at,
        "attempt": job.attempt,
        "email": {
            "to": job.email.to,
            "subject": job.email.subject,
            "text": job.email.text,
            "sender": job.email.sender,
        },
    }
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def decode_job(data: bytes | str) -> Job:
    """Decode :func:`encode_job` output; anything else raises :class:`InvalidJob`."""
    try:
        payload = json.loads(data)
        if payload.get("v") != JOB_FORMAT_VERSION:
            raise ValueError(f"unsupported job format version {payload.get('v')!r}")
        email = payload["email"]
        return Job(
            id=str(payload["id"]),
            enqueued_at=float(payload["enqueued_at"]),
            attempt=int(payload["attempt"]),
            email=Email(
                to=str(email["to"]),
                subject=str(email["subject"]),
                text=str(email["text"]),
                sender=str(email["sender"]),
            ),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidJob(f"not a mailbench job: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Delivery:
    """A job handed to one consumer, to be settled exactly once.

    ``handle`` is the backend's own receipt (a delivery tag, a stream entry id, a row id
    with its lease token); callers treat it as opaque. ``received_at`` is when the
    consumer got it, so ``received_at - job.enqueued_at`` is the queue wait.
    ``deliveries`` counts the times the broker has handed this job out, this one
    included: a redelivery after a crash, a lease expiry or a visibility timeout counts,
    although no API call was made (``job.attempt`` counts those). It counts since the
    job's last ``retry``, and a ``hand_back`` takes back its own count. Where it comes
    from: Redis, the stream entry's delivery count (``XPENDING``) plus what a hand-back
    carried over; SQLite and PostgreSQL, the row's ``deliveries`` column, incremented by
    the claim; RabbitMQ, the ``x-delivery-count`` header; memory, its own counter.
    """

    job: Job
    handle: Any
    received_at: float = field(default_factory=time.time)
    deliveries: int = 1


@runtime_checkable
class Queue(Protocol):
    """What a server needs to enqueue and a worker needs to consume."""

    async def enqueue(self, job: Job) -> None:
        """Durably store ``job``; return only when the broker has accepted it."""

    def consume(self, prefetch: int) -> AsyncIterator[Delivery]:
        """Yield deliveries forever, holding at most ``prefetch`` unsettled at once
        (backends may fetch in batches up to that size). Stops when the queue is closed."""

    async def ack(self, delivery: Delivery) -> None:
        """The job is done (the email API accepted it): remove it for good."""

    async def retry(self, delivery: Delivery, delay: float) -> None:
        """Make the job visible again after ``delay`` seconds with ``attempt + 1``."""

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move the job aside with ``reason``; it is never delivered again."""

    async def hand_back(self, delivery: Delivery) -> None:
        """Return a delivery that was never started, to be delivered again at once (to
        any consumer), with the same ``attempt`` and without counting this delivery."""

    async def depth(self) -> int:
        """Jobs still to be sent, excluding dead letters. What each backend counts:

        * memory: ready, delayed (retries) and in flight, of every consumer;
        * SQLite, PostgreSQL: rows ``available`` (due, or waiting out a retry's delay)
          or ``running`` (claimed by any consumer, until settled or its lease expires);
        * Redis: the stream's entries (waiting, and delivered to any consumer but not yet
          settled: a settle deletes the entry) plus the retries in the delayed set;
        * RabbitMQ: ready messages of the queue and its wait queues (retries), plus the
          *caller's own* unacknowledged deliveries: AMQP does not report other
          consumers'. So a producer's or an observer's connection sees the jobs that
          workers hold as gone. The harness asks the broker itself instead
          (``harness/run/depth.py``).
        """

    async def dead_letters(self) -> int:
        """Jobs in the dead letter."""

    async def close(self) -> None:
        """Release connections; unsettled deliveries will be redelivered later."""
