"""The contract between the request handler and the code that sends or enqueues.

A :class:`Sender` is opened once per server process (in the app's ``cleanup_ctx``) from a
:class:`SenderContext`, takes one :class:`~queues.base.Job` per valid form and says what
became of it in a :class:`Handed`: accepted (the 2xx promise: the API took the email, or
the broker durably took the job) or refused with the status and sentence to answer.
Which class serves which mode is declared in :mod:`servers.modes`.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol

from queues.base import Email, Job
from servers.mailgun import MailgunSettings, Outcome
from servers.metrics import Recorder
from servers.modes import Mode
from servers.render import Renderer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Handed:
    """What happened to an email the handler tried to hand on."""

    accepted: bool
    status: int
    state: str  # "sent", "queued" or "failed"
    detail: str = ""


@dataclass(frozen=True, slots=True)
class SenderContext:
    """What a sender may use: the API's settings, the queue's address, the render cost,
    the process's histograms (``api``, ``enqueue``, ``render``), and a framework mode's
    configuration."""

    mailgun: MailgunSettings
    recorder: Recorder
    queue_url: str | None = None
    queue_name: str = "mailbench"
    render_ms: float = 0.0
    framework_config: str | None = None  # a framework mode's: "default" or "reliable"


class Backlog(Protocol):
    """What ``/_mailbench/depth`` counts: a queue, or a background sender's tasks."""

    async def depth(self) -> int: ...


class Sender(Protocol):
    renderer: Renderer | None  # the per-email render, where it runs in the request

    @property
    def queue(self) -> Backlog | None:
        """The queue (or tasks in flight) whose depth /_mailbench/depth reports (None: none)."""

    @classmethod
    async def open(cls, context: SenderContext) -> Sender: ...

    async def hand(self, job: Job) -> Handed: ...

    async def aclose(self) -> None: ...


def start_renderer(context: SenderContext) -> Renderer | None:
    """Calibrate the per-email render (``--render-ms``) before the server takes requests."""
    return Renderer(context.render_ms) if context.render_ms > 0 else None


def render_inline(
    renderer: Renderer | None, recorder: Recorder, email: Email
) -> list[tuple[str, bytes]]:
    """The email's card, rendered right here, synchronously, on the event loop.

    Deliberately so: this is the naive app the benchmark shows. While one card renders,
    no other request of this process is served, the form page included; async I/O does
    not hide CPU work. (The queued modes leave the render to the worker.)
    """
    if renderer is None:
        return []
    started = time.perf_counter()
    inline = renderer.inline(email)
    recorder.record("render", time.perf_counter() - started)
    return inline


def api_result(ok: bool, outcome: Outcome, detail: str) -> Handed:
    """The handler's answer once the API has answered."""
    if ok:
        return Handed(True, 200, "sent")
    status = 503 if outcome is Outcome.RETRYABLE else 502
    return Handed(False, status, "failed", f"The email service did not take it ({detail}).")


QUEUE_UNAVAILABLE = Handed(False, 503, "failed", "The mail queue is unavailable; try again.")


def queued_result(recorder: Recorder, started: float) -> Handed:
    """The handler's answer once the broker took the job (``started``: the enqueue's
    ``perf_counter``, whose time goes to the ``enqueue`` histogram)."""
    recorder.record("enqueue", time.perf_counter() - started)
    return Handed(True, 202, "queued")


async def enqueued(
    recorder: Recorder,
    enqueue: Awaitable[object],
    errors: type[Exception] | tuple[type[Exception], ...],
) -> Handed:
    """Await an async enqueue (not started yet: a coroutine) and answer: 202 once the
    broker took the job, 503 when it raised one of ``errors``."""
    started = time.perf_counter()
    try:
        await enqueue
    except errors as exc:
        log.warning("enqueue failed: %r", exc)
        return QUEUE_UNAVAILABLE
    return queued_result(recorder, started)


async def open_sender(mode: Mode, context: SenderContext) -> Sender:
    """Import the mode's sender class (only now: serving one mode never loads another's
    driver) and open it."""
    module_name, _, class_name = mode.sender.partition(":")
    sender_class = getattr(importlib.import_module(module_name), class_name)
    sender: Sender = await sender_class.open(context)
    return sender
