"""``naive``: the first-version queue of the Dream email example, on RabbitMQ.

A faithful copy of the design of ``email.ml`` in jsthomas/dream-email-example (OCaml,
amqp-client-lwt), the queue a tutorial hands its readers first:

* the form handler opens a **new AMQP connection per request**, a channel with **no
  publisher confirms**, declares the queue (not durable) and publishes a transient
  message; the page then says "Sent" whatever became of it
  (:mod:`servers.senders.naive`);
* one worker loop takes a message with ``basic.get`` and **auto-ack** (``no_ack``): the
  broker forgets it the moment it is handed out; when the queue is empty the loop
  **sleeps 5 s**;
* it posts to the API and prints the status: **no retry, no check** — a 5xx is an email
  gone, and nothing counts it.

Two changes so that it can run under load at all, neither of which saves an email: the
handler closes its connection after publishing (the original never does; thousands of
open connections would take the broker down, a different failure), and up to
``--concurrency`` sends run at once from the one polling loop, which takes as many more
messages to wait for a send (the original takes the next message once it sent the last:
one in flight, none waiting), so the worker keeps up with the load. What it has taken
is in its memory only: a kill loses every message waiting (and any send not yet out).
The client is the project's (it has timeouts; the original's has none).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import time
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from queues.base import decode_job
from queues.errors import ConfigError, InvalidJob
from queues.rabbitmq import AmqpDepth
from queues.urls import redact_url
from servers.mailgun import (
    MailgunClient,
    MailgunSettings,
    add_mailgun_arguments,
    mailgun_settings_from_args,
)
from servers.phases import PhasedRecorder, PhaseFile, add_phase_argument, write_phases
from servers.queue_url import QUEUE_URL_VAR, queue_url_from

if TYPE_CHECKING:
    from aio_pika.abc import AbstractChannel, AbstractQueue

log = logging.getLogger(__name__)

IDLE_SLEEP_S = 5.0  # the original's Lwt_unix.sleep 5. on an empty queue


async def declare(channel: AbstractChannel, name: str) -> AbstractQueue:
    """The queue as the original declares it: not durable, default arguments."""
    return await channel.declare_queue(name)


@dataclass(frozen=True, slots=True)
class NaiveSettings:
    url: str = field(repr=False)  # the broker URL, with its password
    queue_name: str = "mailbench"
    concurrency: int = 1
    idle_sleep_s: float = IDLE_SLEEP_S
    mailgun: MailgunSettings = field(default_factory=MailgunSettings)
    metrics_out: Path | None = None
    phase_file: Path | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be at least 1, not {self.concurrency}.")


class NaiveWorker:
    """Polls ``queue`` and sends what it gets, forgetting each message as it takes it."""

    def __init__(self, settings: NaiveSettings, queue: AbstractQueue, client: MailgunClient):
        self.settings = settings
        self.queue = queue
        self.client = client
        self.recorder = PhasedRecorder()
        self.taken = 0
        self.statuses: dict[str, int] = {}  # the API's answers, printed, never acted on
        self._slots = asyncio.Semaphore(settings.concurrency)  # sends in flight
        # Messages taken, sending or waiting for a send: as many wait as are sent.
        self._held = asyncio.Semaphore(2 * settings.concurrency)
        self._sends: set[asyncio.Task[None]] = set()
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        phases = PhaseFile(self.settings.phase_file, self.recorder)
        phases.check()
        following = asyncio.create_task(phases.follow(), name="mailbench-phases")
        try:
            await self._poll()
        finally:
            # A stop lets the sends in flight end; what they held is not in the queue
            # any more (auto-ack), so a kill instead of a stop loses it.
            if self._sends:
                await asyncio.wait(set(self._sends), timeout=self.settings.mailgun.timeout + 5)
            following.cancel()
            await asyncio.wait({following})
            if self.settings.metrics_out is not None:
                write_phases(self.settings.metrics_out, self.recorder, self.snapshot())

    async def _poll(self) -> None:
        while not self.stopping.is_set():
            await self._held.acquire()
            message = await self.queue.get(no_ack=True, fail=False)
            if message is None:
                self._held.release()
                with suppress(TimeoutError):  # "No new tasks, waiting."
                    await asyncio.wait_for(self.stopping.wait(), self.settings.idle_sleep_s)
                continue
            self.taken += 1
            task = asyncio.create_task(self._send(message.body))
            self._sends.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._sends.discard(task)
        self._held.release()

    async def _send(self, body: bytes) -> None:
        try:
            job = decode_job(body)
        except InvalidJob:
            log.warning("received an invalid email record from RabbitMQ: %r", body[:200])
            return
        self.recorder.record("queue_wait", max(0.0, time.time() - job.enqueued_at))
        async with self._slots:  # meanwhile it is in this process's memory only
            started = time.perf_counter()
            result = await self.client.send(job.email, job.id)
            self.recorder.record(result.metric, time.perf_counter() - started)
        # The original prints "API Response Status: %d." and goes on to the next one.
        status = str(result.status) if result.status is not None else result.detail[:40]
        self.statuses[status] = self.statuses.get(status, 0) + 1

    def snapshot(self) -> dict[str, object]:
        return {
            "histograms": self.recorder.encoded(),
            "taken": self.taken,
            "statuses": self.statuses,
        }


async def run_worker(settings: NaiveSettings) -> None:
    import aio_pika

    connection = await aio_pika.connect(settings.url)  # one connection, never re-made
    client = MailgunClient(settings.mailgun)
    try:
        channel = await connection.channel()
        worker = NaiveWorker(settings, await declare(channel, settings.queue_name), client)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, worker.stopping.set)
        print(
            f"mailbench naive-worker polling {redact_url(settings.url)} "
            f"with {settings.concurrency} sends at once",
            flush=True,
        )
        await worker.run()
    finally:
        await client.aclose()
        await connection.close()


async def open_depth(url: str, queue_name: str) -> AmqpDepth:
    """Ready messages of the queue, for a RabbitMQ the harness cannot ask itself (what
    the worker took is not counted anywhere: auto-ack)."""
    return AmqpDepth(url, (queue_name,))


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        metavar="URL",
        help=f"the RabbitMQ URL, amqp:// (default: ${QUEUE_URL_VAR}; on a command line, ps "
        "shows its password to everyone)",
    )
    parser.add_argument("--queue-name", default="mailbench", help="the queue to poll")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="sends at once from the one polling loop (default: 1, the original's)",
    )
    add_mailgun_arguments(parser)
    parser.add_argument("--metrics-out", type=Path, help="write histograms and counts here")
    add_phase_argument(parser)
    # What the harness gives every worker, and this one has no use for: nothing is ever
    # dead-lettered, nothing rendered.
    parser.add_argument("--dead-letters-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--render-ms", type=float, default=0.0, help=argparse.SUPPRESS)


def settings_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> NaiveSettings:
    url = queue_url_from(args.backend, environ, "--backend")
    if url is None or not url.startswith("amqp"):
        raise ConfigError(
            f"the naive worker needs a RabbitMQ URL: set {QUEUE_URL_VAR} to amqp://... "
            "(or pass --backend URL)."
        )
    return NaiveSettings(
        url=url,
        queue_name=args.queue_name,
        concurrency=args.concurrency,
        mailgun=mailgun_settings_from_args(args),
        metrics_out=args.metrics_out,
        phase_file=args.phase_file,
    )


def cli_main(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> int:
    asyncio.run(run_worker(settings_from_args(args, environ)))
    return 0
