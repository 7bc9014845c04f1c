"""What a framework's task does with one job, whichever framework runs it.

The framework's task function decodes nothing and decides nothing itself: it hands the
payload and the attempt number (the framework's own count) to :meth:`TaskRuntime.deliver`
and carries out the :class:`Decision` with the framework's own mechanism — returning,
a retry with a countdown, or a failure once the dead letter is journaled. One runtime per
worker process holds the blocking Mailgun client (most framework workers run tasks in
threads or forked processes, not on an event loop), the card renderer and the figures;
where the tasks are coroutines (Procrastinate), :class:`AsyncTaskRuntime` does the same
with the async client (:meth:`AsyncTaskRuntime.deliver_async`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from queues.base import Email, Job, decode_job
from queues.errors import ConfigError, InvalidJob, QueueError
from servers.mailgun import BlockingMailgunClient, Inline, MailgunClient, Outcome, SendResult
from servers.phases import PhasedRecorder, PhaseFile, write_phases
from servers.render import Renderer
from servers.worker import (
    CRASH_EXIT_CODE,
    WorkerSettings,
    add_cli_arguments,
    backoff_delay,
    journal_dead_letter,
    settings_from_args,
)

log = logging.getLogger(__name__)

TASK_NAME = "mailbench.send_email"  # the task's name on every framework's broker


class BlockingSender(Protocol):
    """What the task needs from a Mailgun client (:class:`BlockingMailgunClient`)."""

    def send(self, email: Email, idempotency_key: str, *, inline: Inline = ()) -> SendResult: ...


class AsyncSender(Protocol):
    """What an async task needs from a Mailgun client (:class:`MailgunClient`)."""

    async def send(
        self, email: Email, idempotency_key: str, *, inline: Inline = ()
    ) -> SendResult: ...


@dataclass(frozen=True, slots=True)
class Decision:
    """What the framework does with the job next."""

    action: str  # "done": sent; "retry": again after ``delay`` s; "dead": journaled, give up
    delay: float = 0.0
    reason: str = ""


DONE = Decision("done")


@dataclass(frozen=True, slots=True)
class FrameworkWorkerSettings:
    """A framework worker's settings: mailbench's worker's, and the configuration."""

    worker: WorkerSettings
    config: str = "default"  # "default" or "reliable" (servers.modes.FRAMEWORK_CONFIGS)

    @property
    def reliable(self) -> bool:
        return self.config == "reliable"


def add_framework_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of mailbench's worker (the harness passes the same ones) and
    ``--config``."""
    add_cli_arguments(parser)
    parser.add_argument(
        "--config",
        choices=("default", "reliable"),
        default="default",
        help="the framework as it ships (default), or as its docs recommend so that no "
        "accepted job is lost to a worker crash or a broker restart (reliable)",
    )


def framework_settings_from_args(
    args: argparse.Namespace, environ: Mapping[str, str]
) -> FrameworkWorkerSettings:
    return FrameworkWorkerSettings(settings_from_args(args, environ), config=args.config)


def run_cli(
    run_worker: Callable[[FrameworkWorkerSettings], None],
    args: argparse.Namespace,
    environ: Mapping[str, str],
) -> int:
    """A framework worker subcommand's ``cli_main``: its settings, then its worker."""
    run_worker(framework_settings_from_args(args, environ))
    return 0


class TaskRuntime:
    """One worker process's client, renderer and figures; thread-safe.

    With ``journal`` (a path), every figure is also kept as an event and :meth:`flush`
    appends them there, for workers whose tasks run in a process that ends with the job
    (RQ's work-horses); :func:`replay_journal` turns the lines back into figures.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        client: BlockingSender | None = None,
        renderer: Renderer | None = None,
        journal: Path | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self._client = client  # made on first use: an async runtime never needs one
        self.renderer = renderer or Renderer(settings.render_ms)
        self._replaying_at: float | None = None  # replay_journal's value's time
        self.recorder = PhasedRecorder(clock=self._now)
        self.phases = PhaseFile(settings.phase_file, self.recorder)
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.dead_lettered: list[tuple[str, str]] = []
        self.journal = journal
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._rng = rng or random.Random()

    @property
    def client(self) -> BlockingSender:
        if self._client is None:
            self._client = BlockingMailgunClient(self.settings.mailgun)
        return self._client

    @client.setter
    def client(self, client: BlockingSender) -> None:
        self._client = client

    def deliver(self, payload: str | bytes, attempt: int) -> Decision:
        """Send the job once (waiting out 429s in place); ``attempt`` counts the framework's
        earlier tries of it (0: the first)."""
        begun = self._begin(payload, attempt)
        if isinstance(begun, Decision):
            return begun
        job, failed = begun
        if failed is not None:
            return self._decide(job, attempt, failed)
        try:
            inline = self._render(job)
        except Exception as exc:
            result = self._render_failed(job, exc)
        else:
            result = self._wait_out_rate_limit(job, inline, self._send(job, inline))
        return self._decide(job, attempt, result)

    def _begin(self, payload: str | bytes, attempt: int) -> Decision | tuple[Job, None]:
        """The job (its queue wait recorded on the first attempt), or the decision on a
        payload that is none."""
        try:
            job = decode_job(payload)
        except InvalidJob as exc:
            # No recipient to journal: the framework fails it, its logs keep the payload.
            log.error("a task payload that is no job: %s", exc)
            self._count("errors", "invalid payload")
            return Decision("dead", reason=f"invalid payload: {exc}")
        if attempt == 0:
            self.record("queue_wait", max(0.0, time.time() - job.enqueued_at))
        return job, None

    def _render_failed(self, job: Job, exc: Exception) -> SendResult:
        log.exception("job %s: rendering its card failed", job.id)
        self._count("errors", f"render {type(exc).__name__}")
        return SendResult(Outcome.RETRYABLE, None, detail=f"render failed: {exc!r}")

    def _decide(self, job: Job, attempt: int, result: SendResult) -> Decision:
        attempts = attempt + 1
        if result.outcome is Outcome.SUCCESS:
            self._count("counts", "acked")
            return DONE
        if result.outcome is Outcome.PERMANENT:
            return self.give_up(job, result.detail or f"HTTP {result.status}")
        if attempts >= self.settings.max_attempts:
            return self.give_up(job, f"gave up after {attempts} attempts: {result.detail}")
        if result.retry_after is not None:
            delay = result.retry_after
        else:
            delay = backoff_delay(
                attempt, self.settings.backoff_base, self.settings.backoff_cap, self._rng
            )
        self._count("counts", "retried")
        return Decision("retry", delay=delay, reason=result.detail)

    def give_up(self, job: Job, reason: str) -> Decision:
        """Journal the dead letter (before the framework hears of it: a worker killed in
        between leaves a line for a job that comes back, never a failure without one)."""
        log.warning("job %s: dead-lettered: %s", job.id, reason)
        journal_dead_letter(self.settings.dead_letters_out, job, reason)
        with self._lock:
            self.dead_lettered.append((job.id, reason))
            self._events.append({"dead": [job.id, reason]})
        return Decision("dead", reason=reason)

    def _render(self, job: Job) -> list[tuple[str, bytes]]:
        if not self.renderer.enabled:
            return []
        started = time.perf_counter()
        inline = self.renderer.inline(job.email)
        self.record("render", time.perf_counter() - started)
        return inline

    def _send(self, job: Job, inline: Inline) -> SendResult:
        started = self._before_send(job)
        try:
            result = self.client.send(job.email, job.id, inline=inline)
        except Exception as exc:
            return self._send_raised(job, exc)
        return self._sent(result, started)

    def _before_send(self, job: Job) -> float:
        if job.email.subject == self.settings.inject_crash_subject:
            print(f"crashing on purpose before sending job {job.id}", flush=True)
            os._exit(CRASH_EXIT_CODE)
        return time.perf_counter()

    def _send_raised(self, job: Job, exc: Exception) -> SendResult:
        log.exception("job %s: unexpected error from the email client", job.id)
        self._count("errors", f"exception {type(exc).__name__}")
        return SendResult(Outcome.RETRYABLE, None, detail=f"unexpected error: {exc!r}")

    def _sent(self, result: SendResult, started: float) -> SendResult:
        self.record(result.metric, time.perf_counter() - started)
        if result.outcome is not Outcome.SUCCESS:
            status = result.status if result.status is not None else "no answer"
            self._count("errors", f"{result.outcome.value} {status}")
        return result

    def _wait_out_rate_limit(self, job: Job, inline: Inline, result: SendResult) -> SendResult:
        """A 429 asks the sender to slow down: wait ``Retry-After`` holding the task's
        slot of the pool and call again, without spending an attempt, as mailbench's
        worker does; after ``rate_limit_waits`` waits in a row it is a retry."""
        waits = 0
        while (delay := self._rate_limit_wait(result, waits)) is not None:
            waits += 1
            time.sleep(delay)
            result = self._send(job, inline)
        return result

    def _rate_limit_wait(self, result: SendResult, waits: int) -> float | None:
        """How long to wait before calling again after ``result`` (None: do not)."""
        if result.status != 429 or waits >= self.settings.rate_limit_waits:
            return None
        self._count("counts", "rate_limited")
        if result.retry_after is not None:
            return min(result.retry_after, self.settings.backoff_cap)
        return backoff_delay(
            waits + 1, self.settings.backoff_base, self.settings.backoff_cap, self._rng
        )

    def _now(self) -> float:
        return self._replaying_at if self._replaying_at is not None else time.time()

    def record(self, name: str, seconds: float) -> None:
        with self._lock:
            self.phases.check()
            self.recorder.record(name, seconds)
            if self.journal is not None:
                self._events.append({"n": name, "s": seconds, "t": time.time()})

    def _count(self, which: str, key: str) -> None:
        with self._lock:
            getattr(self, which)[key] += 1
            if self.journal is not None:
                self._events.append({which: key})

    def flush(self) -> None:
        """Append the events kept since the last flush to the journal, in one write."""
        if self.journal is None:
            return
        with self._lock:
            events, self._events = self._events, []
        if events:
            text = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in events)
            with self.journal.open("a") as out:
                out.write(text)

    def snapshot(self) -> dict[str, object]:
        """The counts in the shape of mailbench's worker's metrics file."""
        return {
            "acked": self.counts["acked"],
            "retried": self.counts["retried"],
            "rate_limited": self.counts["rate_limited"],
            "handed_back": 0,
            "dead_lettered": [list(entry) for entry in self.dead_lettered],
            "errors": dict(self.errors),
        }

    def write_metrics(self, extra: Mapping[str, object] | None = None) -> None:
        if self.settings.metrics_out is not None:
            self.phases.check()
            write_phases(
                self.settings.metrics_out, self.recorder, {**self.snapshot(), **(extra or {})}
            )


class AsyncTaskRuntime(TaskRuntime):
    """The runtime of a framework whose tasks are coroutines on its worker's event loop
    (Procrastinate's): the same decisions, journal and figures, with the async Mailgun
    client and ``asyncio.sleep`` for a 429. Made and used inside that loop."""

    def __init__(
        self,
        settings: WorkerSettings,
        client: AsyncSender | None = None,
        renderer: Renderer | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(settings, renderer=renderer, rng=rng)
        self.async_client: AsyncSender = client or MailgunClient(settings.mailgun)

    async def deliver_async(self, payload: str | bytes, attempt: int) -> Decision:
        """:meth:`TaskRuntime.deliver`, awaiting the API; the card renders in a thread."""
        begun = self._begin(payload, attempt)
        if isinstance(begun, Decision):
            return begun
        job = begun[0]
        try:
            inline = await asyncio.to_thread(self._render, job) if self.renderer.enabled else []
        except Exception as exc:
            result = self._render_failed(job, exc)
        else:
            result = await self._send_async(job, inline)
            waits = 0
            while (delay := self._rate_limit_wait(result, waits)) is not None:
                waits += 1
                await asyncio.sleep(delay)
                result = await self._send_async(job, inline)
        return self._decide(job, attempt, result)

    async def _send_async(self, job: Job, inline: Inline) -> SendResult:
        started = self._before_send(job)
        try:
            result = await self.async_client.send(job.email, job.id, inline=inline)
        except Exception as exc:
            return self._send_raised(job, exc)
        return self._sent(result, started)

    async def aclose(self) -> None:
        close = getattr(self.async_client, "aclose", None)
        if close is not None:
            await close()


def replay_journal(runtime: TaskRuntime, lines: Iterable[str]) -> None:
    """Add the figures of a journal's lines (:meth:`TaskRuntime.flush`) to ``runtime``'s,
    each value in the phase in which it was taken."""
    runtime.phases.check()
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if "n" in event:
            runtime._replaying_at = float(event["t"])
            try:
                runtime.recorder.record(str(event["n"]), float(event["s"]))
            finally:
                runtime._replaying_at = None
        elif "dead" in event:
            runtime.dead_lettered.append((str(event["dead"][0]), str(event["dead"][1])))
        for which in ("counts", "errors"):
            if which in event:
                getattr(runtime, which)[str(event[which])] += 1


class RedisDepth:
    """A framework's depth probe on Redis, with redis-py alone (the harness runs it):
    subclasses count in :meth:`count`; a Redis error (a broker restarting) is a
    :class:`QueueError`, which the sampler retries."""

    what = "the queue"
    parameter: str | None = None  # the mode's lease parameter: mailbench's, not Redis's

    def __init__(self, url: str, queue_name: str) -> None:
        import redis.asyncio as aioredis

        self.redis = aioredis.Redis.from_url(strip_parameter(url, self.parameter)[0])
        self.queue_name = queue_name

    async def count(self) -> int:
        raise NotImplementedError

    async def depth(self) -> int:
        from redis.exceptions import RedisError

        try:
            return await self.count()
        except RedisError as exc:
            raise QueueError(f"{self.what} could not be counted: {exc!r}") from exc

    async def close(self) -> None:
        await self.redis.aclose()


def strip_parameter(url: str, name: str | None) -> tuple[str, float | None]:
    """``url`` without mailbench's ``name=`` parameter (a lease chaos shortens), and its
    value in seconds (None when absent)."""
    if name is None or "?" not in url:
        return url, None
    base, _, query = url.partition("?")
    kept, value = [], None
    for pair in query.split("&"):
        key, _, text = pair.partition("=")
        if key != name:
            kept.append(pair)
            continue
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{name}={text!r} in the queue URL is not a number") from None
    return base + (f"?{'&'.join(kept)}" if kept else ""), value
