"""The queue worker: consume jobs, send them through the Mailgun API, settle each one.

Up to ``concurrency`` API calls are in flight at once, each in its own task. A delivery
is acknowledged only after the API accepted the email. A 429 (rate limited) is waited
out in place for ``Retry-After``, holding the API slot so the worker slows down as asked,
and does not spend an attempt. A retryable failure (5xx, timeout, connection error, a
malformed answer, or an unexpected exception in the client or the render) goes back to
the queue with exponential backoff and full jitter, or after ``Retry-After`` when the API
sent one; a permanent failure, or a job that used up its attempts, goes to the dead
letter with the reason. Every call carries the job's id as idempotency key, so a
retry after a timeout (whose outcome is unknown) cannot send the email twice.

With a render cost (``--render-ms``), each email's card is rendered in the worker's one
render thread before its API call and sent inline (see :mod:`servers.render`): CPU work
per email that, unlike in the server's ``direct`` mode, never holds up a web request.

A job that kills its worker (a *poison job*: it exhausts memory, crashes the client
library) never gets as far as a failed API call, so its attempts never grow; the broker
counts its deliveries instead (:attr:`queues.base.Delivery.deliveries`). A delivery
beyond ``max_deliveries`` is dead-lettered, with the count in the reason, before any
call. The other jobs a dying worker held come back counted too; so that they do not
follow it into the dead letter, a delivery on its last chance (``deliveries ==
max_deliveries``, after at least one redelivery) is sent alone: the worker hands back
everything it has not started, lets the calls in flight end, sends that one job and
only then goes on.

On SIGTERM/SIGINT the worker stops taking deliveries and hands back at once every
delivery it has not started, so other workers get them without waiting out a lease; it
lets the calls in flight finish for up to ``drain_timeout`` seconds and settles them;
whatever is still unsettled goes back to the queue when the queue is closed
(at-least-once). Then it writes its metrics.

What it records: ``queue_wait`` (a job's acceptance by the server to its first claim),
each API call's time by outcome (``api`` for the calls the API accepted,
``api_rate_limited``, ``api_retryable``, ``api_failed``) and ``render``; by phase of the
run when the harness names phases (``--phase-file``, see :mod:`servers.phases`).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import random
import signal
import time
from collections.abc import AsyncGenerator, Awaitable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from queues import Queue, open_queue
from queues.base import Delivery, Email, Job
from queues.errors import ConfigError
from queues.urls import redact_url
from servers.mailgun import (
    Inline,
    MailgunClient,
    MailgunSettings,
    Outcome,
    SendResult,
    add_mailgun_arguments,
    mailgun_settings_from_args,
)
from servers.metrics import Summary
from servers.phases import PhasedRecorder, PhaseFile, add_phase_argument, write_phases
from servers.queue_url import QUEUE_URL_VAR, queue_url_from
from servers.render import Renderer

log = logging.getLogger(__name__)

# A 2**attempt this large already exceeds any sensible cap; it keeps the float finite.
_MAX_BACKOFF_EXPONENT = 62
CRASH_EXIT_CODE = 70  # --inject-crash-subject's exit, as a crash of the process would end it


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    backend: str = field(repr=False)  # the queue URL, with the broker's password
    queue_name: str = "mailbench"
    concurrency: int = 200
    prefetch: int | None = None  # None: the concurrency plus a quarter, see prefetch_count
    mailgun: MailgunSettings = field(default_factory=MailgunSettings)
    render_ms: float = 0.0  # CPU work per email, a card rendered before its API call (0: none)
    max_attempts: int = 5
    max_deliveries: int = 5  # deliveries of one attempt before it is taken for a poison job
    backoff_base: float = 1.0
    backoff_cap: float = 30.0
    rate_limit_waits: int = 30  # 429s waited out in place before the job is re-queued
    drain_timeout: float | None = None  # None: the client timeout + 5 s
    metrics_out: Path | None = None
    dead_letters_out: Path | None = None  # a JSON line per dead letter, appended at once
    phase_file: Path | None = None  # the harness's phases of the run (servers.phases)
    # A fault for tests: the process exits at once when about to send this subject.
    inject_crash_subject: str | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be at least 1, not {self.concurrency}.")
        if self.prefetch is not None and self.prefetch < 1:
            raise ConfigError(f"prefetch must be at least 1, not {self.prefetch}.")
        if self.max_attempts < 1:
            raise ConfigError(f"max attempts must be at least 1, not {self.max_attempts}.")
        if self.max_deliveries < 1:
            raise ConfigError(f"max deliveries must be at least 1, not {self.max_deliveries}.")
        if self.backoff_base < 0 or self.backoff_cap < 0:
            raise ConfigError("backoff base and cap cannot be negative.")

    @property
    def prefetch_count(self) -> int:
        if self.prefetch is not None:
            return self.prefetch
        return self.concurrency + max(1, self.concurrency // 4)

    @property
    def drain_seconds(self) -> float:
        if self.drain_timeout is not None:
            return self.drain_timeout
        return self.mailgun.timeout + 5.0


class EmailSender(Protocol):
    """What the worker needs from a Mailgun client (:class:`MailgunClient` or a double)."""

    async def send(
        self, email: Email, idempotency_key: str, *, inline: Inline = ()
    ) -> SendResult: ...


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full jitter: ``uniform(0, min(cap, base * 2**attempt))``; ``attempt`` counts the
    calls already made before the one that failed, so the first retry waits up to base."""
    ceiling = min(cap, base * 2.0 ** min(max(attempt, 0), _MAX_BACKOFF_EXPONENT))
    return rng.uniform(0.0, ceiling)


def journal_dead_letter(path: Path | None, job: Job, reason: str) -> None:
    """Append the dead letter's line to the journal the harness reads
    (``dead-letters-*.jsonl``: the job's id, recipient and the reason); none without a
    path."""
    if path is None:
        return
    line = json.dumps({"id": job.id, "to": job.email.to, "reason": reason})
    with path.open("a") as journal:
        journal.write(line + "\n")


def _timed_inline(renderer: Renderer, email: Email) -> tuple[list[tuple[str, bytes]], float]:
    started = time.perf_counter()
    inline = renderer.inline(email)
    return inline, time.perf_counter() - started


def _error_key(result: SendResult) -> str:
    if result.detail.startswith("malformed response"):
        return f"{result.outcome.value} malformed"
    if result.status is not None:
        return f"{result.outcome.value} {result.status}"
    if result.detail.startswith("timeout"):
        return f"{result.outcome.value} timeout"
    if result.detail.startswith("connection error"):
        return f"{result.outcome.value} connection"
    return f"{result.outcome.value} other"


class Worker:
    """Consumes ``queue`` and sends through ``client`` until stopped or the queue closes.

    The caller owns ``queue`` and ``client`` and closes them after :meth:`run` returns;
    closing the queue is what hands unsettled deliveries back for redelivery.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        queue: Queue,
        client: EmailSender,
        *,
        rng: random.Random | None = None,
        renderer: Renderer | None = None,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.client = client
        # Calibrates here unless given one; run_worker calibrates before it opens the queue.
        self.renderer = renderer if renderer is not None else Renderer(settings.render_ms)
        # One render at a time per worker process: CPU work scales with processes, not
        # threads, and a worker never takes more than one core from its neighbours.
        self._render_thread = ThreadPoolExecutor(1, thread_name_prefix="mailbench-render")
        self.recorder = PhasedRecorder()
        self.acked = 0
        self.retried = 0
        self.rate_limited = 0  # 429s waited out without spending an attempt
        self.handed_back = 0  # deliveries returned unstarted (shutdown, a job sent alone)
        self.dead_lettered: list[tuple[str, str]] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self._rng = rng or random.Random()
        # Two limits: API calls in flight (the concurrency), and deliveries held unsettled
        # (the prefetch, larger): a job waits ready while another is being acknowledged,
        # so no API slot idles during a broker round trip.
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._held = asyncio.Semaphore(settings.prefetch_count)
        self._in_flight: dict[asyncio.Task[None], Delivery] = {}
        self._unstarted: set[asyncio.Task[None]] = set()  # waiting for an API slot
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def request_stop(self) -> None:
        """Stop taking deliveries (safe to call from a signal handler)."""
        if not self._stopping.is_set():
            log.info("stopping: draining %d API calls in flight", len(self._in_flight))
        self._stopping.set()

    async def stop(self) -> None:
        """Request a stop and wait until :meth:`run` has drained and returned."""
        self.request_stop()
        await self._stopped.wait()

    async def run(self) -> None:
        phases = PhaseFile(self.settings.phase_file, self.recorder)
        phases.check()  # before the first delivery: a worker started mid-run too
        following = asyncio.create_task(phases.follow(), name="mailbench-phases")
        consumer = asyncio.create_task(self._consume(), name="mailbench-consume")
        stop_requested = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({consumer, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_requested.cancel()
            consumer.cancel()
            await asyncio.wait({consumer})
            try:
                await self._hand_back_unstarted()
                await self._drain()
            finally:
                following.cancel()
                await asyncio.wait({following})
                self._render_thread.shutdown(wait=False)
                self.write_metrics()
                log.info("%s", self.summary())
                self._stopped.set()
        if not consumer.cancelled() and (error := consumer.exception()) is not None:
            raise error

    async def _consume(self) -> None:
        while (last_chance := await self._start_deliveries()) is not None:
            await self._send_alone(last_chance)

    async def _start_deliveries(self) -> Delivery | None:
        """Start deliveries as they come, until the queue closes (``None``) or one comes
        on its last chance, which is returned unstarted, holding its slot."""
        deliveries = self.queue.consume(self.settings.prefetch_count)
        try:
            while True:
                await self._held.acquire()
                try:
                    delivery = await anext(deliveries)
                except StopAsyncIteration:
                    self._held.release()
                    log.info("the queue was closed; no more deliveries")
                    return None
                except BaseException:
                    self._held.release()
                    raise
                if 1 < delivery.deliveries == self.settings.max_deliveries:
                    return delivery
                self._start(delivery)
        finally:
            # The queue hands back what it read ahead: this worker holds nothing more.
            if isinstance(deliveries, AsyncGenerator):
                await deliveries.aclose()

    async def _send_alone(self, delivery: Delivery) -> None:
        """Send a job on its last chance with nothing else held: should it crash the
        worker again, only its own count grows."""
        log.warning(
            "job %s: delivered %d times without being settled; sending it alone",
            delivery.job.id,
            delivery.deliveries,
        )
        # Started first, so that a stop meanwhile hands it back with the others.
        task = self._start(delivery, after=set(self._in_flight))
        await self._hand_back_unstarted(keep=task)
        await asyncio.wait({task})

    def _start(
        self, delivery: Delivery, after: set[asyncio.Task[None]] | None = None
    ) -> asyncio.Task[None]:
        """A task that sends ``delivery`` (once the tasks ``after`` have ended)."""
        if delivery.job.attempt == 0 and delivery.deliveries == 1:
            # The first claim only: a retry's wait is its backoff, which the worker chose.
            wait = delivery.received_at - delivery.job.enqueued_at
            self.recorder.record("queue_wait", max(0.0, wait))
        task = asyncio.create_task(
            self._handle(delivery, after or set()), name=f"mailbench-job-{delivery.job.id}"
        )
        self._in_flight[task] = delivery
        self._unstarted.add(task)
        # A done callback, not a finally: a task cancelled before its first step never
        # runs its body, yet its slot must come back.
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(task, None)
        self._unstarted.discard(task)
        self._held.release()
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("job handler failed", exc_info=error)

    async def _handle(self, delivery: Delivery, after: set[asyncio.Task[None]]) -> None:
        job = delivery.job
        if delivery.deliveries > self.settings.max_deliveries:
            self._mark_started()
            reason = (
                f"delivered {delivery.deliveries} times without being settled, more than "
                f"--max-deliveries {self.settings.max_deliveries}: it may crash its worker"
            )
            await self._settle_quietly(job, self._dead_letter(delivery, reason))
            return
        if after:
            await asyncio.wait(after)
        async with self._slots:
            self._mark_started()
            if self._stopping.is_set():  # never started: another worker may have it
                await self._settle_quietly(job, self._hand_back(delivery))
                return
            try:
                inline = await self._render(job)
            except Exception as exc:
                # A card that cannot be rendered loses no email either: retried like a 5xx,
                # dead-lettered once the job has used up its attempts.
                log.exception("job %s: rendering its card failed", job.id)
                self.errors[f"render {type(exc).__name__}"] += 1
                result = SendResult(Outcome.RETRYABLE, None, detail=f"render failed: {exc!r}")
            else:
                result = await self._send(job, inline)
                result = await self._wait_out_rate_limit(job, inline, result)
        await self._settle_quietly(job, self._settle(delivery, result))

    def _mark_started(self) -> None:
        """The running job's task is past the point where a shutdown hands it back."""
        task = asyncio.current_task()
        if task is not None:
            self._unstarted.discard(task)

    async def _settle_quietly(self, job: Job, settle: Awaitable[None]) -> None:
        try:
            await settle
        except Exception as exc:
            # Settling again could duplicate the job; left unsettled, the queue delivers
            # it again (lease expiry, reconnect, or close).
            log.exception("job %s: could not settle it; it will be delivered again", job.id)
            self.errors[f"settle {type(exc).__name__}"] += 1

    async def _hand_back(self, delivery: Delivery) -> None:
        await self.queue.hand_back(delivery)
        self.handed_back += 1

    async def _hand_back_unstarted(self, keep: asyncio.Task[None] | None = None) -> None:
        """Give every delivery still waiting for an API slot (but ``keep``'s) back to the
        queue."""
        waiting = {task: self._in_flight[task] for task in self._unstarted if task is not keep}
        if not waiting:
            return
        for task in waiting:
            task.cancel()
        await asyncio.wait(waiting)
        await asyncio.gather(
            *(self._settle_quietly(d.job, self._hand_back(d)) for d in waiting.values())
        )
        log.info("handed back %d deliveries never started", len(waiting))

    async def _render(self, job: Job) -> list[tuple[str, bytes]]:
        """The job's card (none when rendering is off), rendered in a thread: Pillow
        releases the GIL in most of its C code, and the event loop goes on settling
        other jobs and feeding the API calls in flight meanwhile."""
        if not self.renderer.enabled:
            return []
        loop = asyncio.get_running_loop()
        inline, seconds = await loop.run_in_executor(
            self._render_thread, _timed_inline, self.renderer, job.email
        )
        self.recorder.record("render", seconds)
        return inline

    async def _send(self, job: Job, inline: Inline) -> SendResult:
        if job.email.subject == self.settings.inject_crash_subject:
            print(f"crashing on purpose before sending job {job.id}", flush=True)
            os._exit(CRASH_EXIT_CODE)
        started = time.perf_counter()
        try:
            if inline:
                result = await self.client.send(job.email, job.id, inline=inline)
            else:  # the plain call, which any sender takes
                result = await self.client.send(job.email, job.id)
        except Exception as exc:
            # Whatever broke, the job is not lost: it is retried like a 5xx.
            log.exception("job %s: unexpected error from the email client", job.id)
            self.errors[f"exception {type(exc).__name__}"] += 1
            return SendResult(Outcome.RETRYABLE, None, detail=f"unexpected error: {exc!r}")
        self.recorder.record(result.metric, time.perf_counter() - started)
        if result.outcome is not Outcome.SUCCESS:
            self.errors[_error_key(result)] += 1
        return result

    async def _wait_out_rate_limit(
        self, job: Job, inline: Inline, result: SendResult
    ) -> SendResult:
        """A 429 is the API asking the sender to slow down, not the job failing: wait
        ``Retry-After`` while keeping the API slot (so the whole worker slows down) and
        call again, without spending one of the job's attempts. After
        ``rate_limit_waits`` waits in a row the job goes back to the queue as a retry."""
        waits = 0
        while (
            result.status == 429
            and waits < self.settings.rate_limit_waits
            and not self._stopping.is_set()
        ):
            waits += 1
            self.rate_limited += 1
            if result.retry_after is not None:
                delay = min(max(0.0, result.retry_after), self.settings.backoff_cap)
            else:
                delay = backoff_delay(
                    waits, self.settings.backoff_base, self.settings.backoff_cap, self._rng
                )
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                break
            result = await self._send(job, inline)
        return result

    async def _settle(self, delivery: Delivery, result: SendResult) -> None:
        job = delivery.job
        attempts = job.attempt + 1
        if result.outcome is Outcome.SUCCESS:
            await self.queue.ack(delivery)
            self.acked += 1
        elif result.outcome is Outcome.PERMANENT:
            await self._dead_letter(delivery, result.detail or f"HTTP {result.status}")
        elif attempts >= self.settings.max_attempts:
            reason = f"gave up after {attempts} attempts: {result.detail}"
            await self._dead_letter(delivery, reason)
        else:
            if result.retry_after is not None:
                delay = max(0.0, result.retry_after)
            else:
                delay = backoff_delay(
                    job.attempt, self.settings.backoff_base, self.settings.backoff_cap, self._rng
                )
            log.debug("job %s: %s; retry in %.3f s", job.id, result.detail, delay)
            await self.queue.retry(delivery, delay)
            self.retried += 1

    async def _dead_letter(self, delivery: Delivery, reason: str) -> None:
        log.warning("job %s: dead-lettered: %s", delivery.job.id, reason)
        self._journal_dead_letter(delivery, reason)
        await self.queue.dead_letter(delivery, reason)
        self.dead_lettered.append((delivery.job.id, reason))

    def _journal_dead_letter(self, delivery: Delivery, reason: str) -> None:
        # Written before the queue is told, so a worker killed in between leaves a line
        # for a job that comes back (and is then delivered or dead-lettered again), never
        # a dead letter without a line.
        journal_dead_letter(self.settings.dead_letters_out, delivery.job, reason)

    async def _drain(self) -> None:
        if not self._in_flight:
            return
        timeout = self.settings.drain_seconds
        _, pending = await asyncio.wait(set(self._in_flight), timeout=timeout)
        if pending:
            log.warning(
                "%d API calls still in flight after %.1f s; leaving their jobs to the queue",
                len(pending),
                timeout,
            )
            for task in pending:
                task.cancel()
            await asyncio.wait(pending)

    def snapshot(self) -> dict[str, object]:
        snapshot: dict[str, object] = {
            "histograms": self.recorder.encoded(),
            "acked": self.acked,
            "retried": self.retried,
            "rate_limited": self.rate_limited,
            "handed_back": self.handed_back,
            "dead_lettered": [list(entry) for entry in self.dead_lettered],
            "errors": dict(self.errors),
        }
        if self.renderer.enabled:  # what the render cost was calibrated to
            snapshot["render"] = self.renderer.describe()
        return snapshot

    def write_metrics(self) -> None:
        """The metrics file (the main phase's histograms and every count), and a file
        per other phase in its folder beside it."""
        if self.settings.metrics_out is not None:
            write_phases(self.settings.metrics_out, self.recorder, self.snapshot())

    def summary(self) -> str:
        api = self.recorder.histograms.get("api")
        p50 = f"{Summary.of(api).p50_us / 1000:.1f} ms" if api is not None else "n/a"
        return (
            f"worker done: {self.acked} acked, {self.retried} retried, "
            f"{len(self.dead_lettered)} dead-lettered, {sum(self.errors.values())} errors, "
            f"api p50 {p50}"
        )


async def run_worker(settings: WorkerSettings) -> None:
    """Open the queue and the client, run until SIGTERM/SIGINT, close both."""
    # Calibrated first, in a thread: the timing is then of the render alone.
    renderer = await asyncio.to_thread(Renderer, settings.render_ms)
    queue = await open_queue(settings.backend, settings.queue_name)
    client = MailgunClient(settings.mailgun)
    worker = Worker(settings, queue, client, renderer=renderer)
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        with suppress(NotImplementedError):  # no signal handlers on Windows' loop
            loop.add_signal_handler(signum, worker.request_stop)
    print(
        f"mailbench worker consuming {redact_url(settings.backend)} "
        f"with concurrency {settings.concurrency}",
        flush=True,
    )
    try:
        await worker.run()
    finally:
        for signum in signals:
            with suppress(NotImplementedError):
                loop.remove_signal_handler(signum)
        try:
            await queue.close()
        finally:
            await client.aclose()


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        metavar="URL",
        help="queue URL: amqp://, redis://, sqlite:///path, postgresql://, memory:// "
        f"(default: ${QUEUE_URL_VAR}; on a command line, ps shows its password to everyone)",
    )
    parser.add_argument(
        "--queue-name", default="mailbench", help="the queue to consume (default: mailbench)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=200, help="API calls in flight at most (default: 200)"
    )
    parser.add_argument(
        "--prefetch",
        type=int,
        help="deliveries held unsettled at most (default: the concurrency plus a quarter)",
    )
    parser.add_argument(
        "--max-attempts",
        type=int,
        default=5,
        help="API calls per job before it goes to the dead letter (default: 5)",
    )
    parser.add_argument(
        "--max-deliveries",
        type=int,
        default=5,
        metavar="N",
        help="times a job may be delivered without being settled (its worker crashed, "
        "its lease expired): the next delivery goes to the dead letter, as a poison job's, "
        "and the last one allowed is sent alone (default: 5)",
    )
    add_mailgun_arguments(parser)
    parser.add_argument(
        "--render-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="render a personalised card per email before its API call (in a thread), "
        "calibrated to about MS ms of CPU (default: 0, off)",
    )
    parser.add_argument(
        "--metrics-out",
        type=Path,
        help="write histograms, counts and dead letters here at shutdown",
    )
    parser.add_argument(
        "--dead-letters-out",
        type=Path,
        help="append a JSON line per dead-lettered job here as it happens (survives a kill)",
    )
    add_phase_argument(parser)
    parser.add_argument(
        "--inject-crash-subject",
        metavar="TEXT",
        help="fault for tests: exit at once (code 70, no cleanup) when about to send an "
        "email with this exact subject, as a job that crashes its worker would",
    )


def settings_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> WorkerSettings:
    backend = queue_url_from(args.backend, environ, "--backend")
    if backend is None:
        raise ConfigError(
            f"the worker needs a queue URL: set {QUEUE_URL_VAR} (or pass --backend URL)."
        )
    return WorkerSettings(
        backend=backend,
        queue_name=args.queue_name,
        concurrency=args.concurrency,
        prefetch=args.prefetch,
        max_attempts=args.max_attempts,
        max_deliveries=args.max_deliveries,
        mailgun=mailgun_settings_from_args(args),
        render_ms=args.render_ms,
        metrics_out=args.metrics_out,
        dead_letters_out=args.dead_letters_out,
        phase_file=args.phase_file,
        inject_crash_subject=args.inject_crash_subject,
    )


def cli_main(args: argparse.Namespace) -> int:
    asyncio.run(run_worker(settings_from_args(args, os.environ)))
    return 0
