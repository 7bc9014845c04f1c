"""``background``: the handler starts a task of its own process that sends, and answers.

What FastAPI's ``BackgroundTasks`` or a bare ``asyncio.create_task`` give: the reply is
as fast as a queue's, without a broker or a worker. The task sends with the workers'
client and retry policy (:mod:`servers.worker`: backoff with full jitter, ``Retry-After``
honoured, a 429 waited out without spending an attempt), so a flaky API costs no email
while the process lives. The email lives in that process's memory only: a SIGKILL, an
out-of-memory kill or a deploy that does not wait loses every task whose call the API
has not received yet (waiting out a backoff or a 429, or not yet posted), and nothing
anywhere records that it existed. That is the finding; nothing here persists.

:meth:`BackgroundSender.depth` counts the tasks in flight (``/_mailbench/depth``), so
that the harness's drain knows when nothing can still arrive. A graceful stop (SIGTERM)
waits for them a bounded time, as web servers wait for their requests.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from queues.base import Job
from servers.mailgun import MailgunClient, Outcome, SendResult
from servers.metrics import Recorder
from servers.render import Renderer
from servers.senders.base import (
    Handed,
    SenderContext,
    queued_result,
    render_inline,
    start_renderer,
)
from servers.worker import WorkerSettings, backoff_delay

log = logging.getLogger(__name__)


class BackgroundSender:
    def __init__(self, context: SenderContext) -> None:
        self.client = MailgunClient(context.mailgun)
        self.recorder: Recorder = context.recorder
        self.renderer: Renderer | None = start_renderer(context)
        # The workers' policy, not a copy of its numbers: attempts, backoff, 429 waits.
        self.policy = WorkerSettings(backend="", mailgun=context.mailgun)
        self._rng = random.Random()
        self._tasks: set[asyncio.Task[None]] = set()
        self.sent = 0
        self.gave_up = 0

    @property
    def queue(self) -> BackgroundSender:
        return self  # what is "queued" is the tasks in flight, counted by depth()

    @classmethod
    async def open(cls, context: SenderContext) -> BackgroundSender:
        return cls(context)

    async def hand(self, job: Job) -> Handed:
        started = time.perf_counter()
        task = asyncio.create_task(self._deliver(job), name=f"mailbench-send-{job.id}")
        # The loop keeps only a weak reference to a task: without this one it could be
        # collected half-way (the asyncio docs' warning for create_task).
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return queued_result(self.recorder, started)

    async def depth(self) -> int:
        return len(self._tasks)

    async def _deliver(self, job: Job) -> None:
        policy = self.policy
        inline = render_inline(self.renderer, self.recorder, job.email)
        attempt = waits = 0
        while True:
            result = await self._send(job, inline)
            if result.ok:
                self.sent += 1
                return
            if result.outcome is Outcome.PERMANENT:
                break
            if result.status == 429 and waits < policy.rate_limit_waits:
                waits += 1  # the API asks to slow down: no attempt spent
                exponent = waits
            else:
                attempt += 1
                if attempt >= policy.max_attempts:
                    break
                exponent = attempt - 1  # as the worker's: the first retry waits up to base
            if result.retry_after is not None:
                delay = min(max(0.0, result.retry_after), policy.backoff_cap)
            else:
                delay = backoff_delay(exponent, policy.backoff_base, policy.backoff_cap, self._rng)
            await asyncio.sleep(delay)
        # No dead letter to put it in: the email is gone, and only this line says so.
        self.gave_up += 1
        log.warning("job %s: gave up after %d attempts: %s", job.id, attempt, result.detail)

    async def _send(self, job: Job, inline: list[tuple[str, bytes]]) -> SendResult:
        started = time.perf_counter()
        try:
            result = await self.client.send(job.email, job.id, inline=inline)
        except Exception as exc:
            # As in the worker: whatever broke, the call is retried like a 5xx.
            log.exception("job %s: unexpected error from the email client", job.id)
            return SendResult(Outcome.RETRYABLE, None, detail=f"unexpected error: {exc!r}")
        self.recorder.record(result.metric, time.perf_counter() - started)
        return result

    async def aclose(self) -> None:
        if self._tasks:
            # A graceful stop waits for the sends in flight, bounded as the worker's drain.
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.policy.drain_seconds)
            if pending:
                log.warning("stopping: %d emails in flight abandoned", len(pending))
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending)
        log.info("background sender: %d sent, %d given up", self.sent, self.gave_up)
        await self.client.aclose()
