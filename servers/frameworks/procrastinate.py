"""Procrastinate on PostgreSQL: app, schema, async task, worker.

``mailbench procrastinate-worker --config default|reliable`` runs Procrastinate's own
worker (``App.run_worker_async``, what ``procrastinate worker`` runs) in its process:
one asyncio worker running up to ``--concurrency`` jobs at once (its ``concurrency``),
the task a coroutine that awaits mailbench's async Mailgun client. Procrastinate's docs
give ``concurrency`` for asynchronous, I/O-bound tasks; a blocking task would need a
process per job.

Both configurations:

* **the schema**: Procrastinate's tables and functions must exist before a job is
  deferred. :func:`ensure_schema` applies Procrastinate's own schema
  (``App.schema_manager.apply_schema_async``, what ``procrastinate schema --apply``
  runs) once, under a PostgreSQL advisory lock, and only where its jobs table is
  missing; every server (at start, before it answers) and every worker calls it, so
  the first one of a run applies it and the others find it;
* **the 2xx** rests on the commit of ``defer_async``'s insert (the native async API:
  no thread), with ``queueing_lock`` set to the job's id, so a job cannot be waiting
  twice;
* **retries** with Procrastinate's ``RetryStrategy`` (five attempts in all): the task
  raises :class:`RetryableSend` carrying the delay the task runtime chose — the 5xx's
  ``Retry-After`` when the API sent one, else backoff with full jitter — and
  :class:`SendRetries` (a ``RetryStrategy``) retries at that time through
  ``RetryDecision(retry_at=...)``. A 429 is waited out in place (``asyncio.sleep``).
  The idempotency key is mailbench's job id (in the payload), on every attempt;
* **dead letters**: a job whose last attempt failed, or that the API refused for good,
  is journaled as dead-lettered and then raises :class:`DeadLettered`, which the
  strategy does not retry: the job ends ``failed``, Procrastinate's dead letter.

``reliable`` adds what Procrastinate's docs ("Retry stalled jobs") recommend so that a
job survives a worker killed mid-task: a periodic task, every
:data:`SWEEP_EVERY_S` seconds, that retries the ``doing`` jobs of workers whose
heartbeat is older than the ``stalled`` seconds of the queue URL (default
:data:`STALLED_S`, Procrastinate's 30 s; the worker's heartbeat every third of it).
And since Procrastinate's worker *ends* when it loses its database (a side task — its
listener, heartbeat or periodic deferrer — fails, and it stops itself: a PostgreSQL
restart), the subcommand starts it again in its process, as a deployment's supervisor
would (in ``default`` the process ends, and the harness starts another).

``default`` is Procrastinate as it ships: a job whose worker was killed stays ``doing``
for ever (a new worker prunes the dead one's heartbeat, but nothing moves its jobs back
to ``todo``), and the drain waits for it until its timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import hashlib
import logging
import os
import signal
from collections.abc import Mapping
from typing import Any

from procrastinate import App, JobContext, PsycopgConnector, RetryStrategy
from procrastinate.exceptions import AlreadyEnqueued, ConnectorException
from procrastinate.jobs import Job as ProcrastinateJob
from procrastinate.retry import RetryDecision

from queues.base import Job, encode_job
from queues.errors import QueueError
from servers.frameworks.task import (
    TASK_NAME,
    AsyncTaskRuntime,
    FrameworkWorkerSettings,
    add_framework_worker_arguments,
    run_cli,
    strip_parameter,
)

log = logging.getLogger(__name__)

STALLED_PARAMETER = "stalled"  # the mode's lease parameter: seconds without a heartbeat
STALLED_S = 30.0  # Procrastinate's default stalled_worker_timeout / seconds_since_heartbeat
SWEEP_EVERY_S = 10  # the periodic task that retries stalled jobs (the docs': 10 minutes)
SWEEP_TASK = "mailbench.retry_stalled_jobs"
RESTART_AFTER_S = 1.0
SCHEMA_LOCK = 0x6D61696C  # pg_advisory_lock's key: "mail"
POOL_SIZE = 10  # the sender's connections, as the postgres mode's pool
# Procrastinate notifies on the channel "procrastinate_queue_v1#<queue>", and PostgreSQL
# refuses channel names longer than 63 bytes: a queue name has 40 at most.
MAX_QUEUE_NAME = 63 - len("procrastinate_queue_v1#")


class DeadLettered(Exception):
    """The job gave up on its email; the dead letter is journaled."""


class RetryableSend(Exception):
    """The API call failed in a way a later attempt may not; ``delay``: when to retry."""

    def __init__(self, reason: str, delay: float) -> None:
        super().__init__(reason)
        self.delay = delay


class SendRetries(RetryStrategy):
    """Procrastinate's ``RetryStrategy`` (at most ``max_attempts`` retries, only of
    :class:`RetryableSend`), retrying at the time the task runtime chose."""

    def get_retry_decision(
        self, *, exception: BaseException, job: ProcrastinateJob
    ) -> RetryDecision | None:
        decision = super().get_retry_decision(exception=exception, job=job)
        if decision is None or not isinstance(exception, RetryableSend):
            return None
        at = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=exception.delay)
        return RetryDecision(retry_at=at)


def database_url(url: str) -> tuple[str, float]:
    """The libpq URL without mailbench's ``stalled`` parameter, and its value."""
    conninfo, stalled = strip_parameter(url, STALLED_PARAMETER)
    return conninfo, stalled or STALLED_S


def queue_of(queue_name: str) -> str:
    """Procrastinate's queue for mailbench's ``queue_name`` (which holds the run id and
    the mode): the name itself, or where too long its head and a hash of the whole."""
    if len(queue_name) <= MAX_QUEUE_NAME:
        return queue_name
    digest = hashlib.sha256(queue_name.encode()).hexdigest()[:12]
    return f"{queue_name[: MAX_QUEUE_NAME - 13]}-{digest}"


def make_app(url: str, **pool: Any) -> App:
    return App(connector=PsycopgConnector(conninfo=database_url(url)[0], **pool))


async def ensure_schema(url: str) -> bool:
    """Apply Procrastinate's schema unless its jobs table exists; True if it was applied.
    One connection (so that the advisory lock and the apply share it): concurrent
    callers wait for the first, then find the table."""
    app = make_app(url, min_size=1, max_size=1)
    async with app.open_async():
        connector = app.connector
        await connector.execute_query_async(f"SELECT pg_advisory_lock({SCHEMA_LOCK})")
        try:
            row = await connector.execute_query_one_async(
                "SELECT to_regclass('procrastinate_jobs') IS NOT NULL AS present"
            )
            if row["present"]:
                return False
            await app.schema_manager.apply_schema_async()
            log.info("applied Procrastinate's schema")
            return True
        finally:
            await connector.execute_query_async(f"SELECT pg_advisory_unlock({SCHEMA_LOCK})")


async def defer(app: App, queue_name: str, job: Job) -> None:
    """Defer the job (Procrastinate's async API); returns once its insert committed."""
    deferrer = app.configure_task(TASK_NAME, queue=queue_of(queue_name), queueing_lock=job.id)
    with contextlib.suppress(AlreadyEnqueued):  # the same job is waiting: accepted once
        await deferrer.defer_async(payload=encode_job(job).decode())


def register_tasks(app: App, runtime: AsyncTaskRuntime, settings: FrameworkWorkerSettings) -> None:
    """The send task, and in ``reliable`` the periodic retry of stalled jobs."""
    retries = SendRetries(
        max_attempts=runtime.settings.max_attempts - 1, retry_exceptions={RetryableSend}
    )

    @app.task(name=TASK_NAME, retry=retries, pass_context=True)
    async def send_email(context: JobContext, payload: str) -> None:
        decision = await runtime.deliver_async(payload, context.job.attempts)
        if decision.action == "retry":
            raise RetryableSend(decision.reason, decision.delay)
        if decision.action == "dead":
            raise DeadLettered(decision.reason)

    if not settings.reliable:
        return
    queue_name = queue_of(settings.worker.queue_name)
    stalled = database_url(settings.worker.backend)[1]

    @app.periodic(
        cron=f"* * * * * */{SWEEP_EVERY_S}",
        queue=queue_name,
        queueing_lock=f"{SWEEP_TASK}:{queue_name}",
    )
    @app.task(name=SWEEP_TASK)
    async def retry_stalled_jobs(timestamp: int) -> None:
        stalled_jobs = await app.job_manager.get_stalled_jobs(
            queue=queue_name, task_name=TASK_NAME, seconds_since_heartbeat=stalled
        )
        for job in stalled_jobs:
            log.warning("retrying job %s of a stalled worker", job.id)
            await app.job_manager.retry_job(job)


def worker_options(settings: FrameworkWorkerSettings) -> dict[str, Any]:
    """``run_worker_async``'s options (the CLI's ``procrastinate worker`` flags)."""
    options: dict[str, Any] = {
        "queues": [queue_of(settings.worker.queue_name)],
        "concurrency": settings.worker.concurrency,
        "name": f"mailbench-{os.getpid()}",
        "install_signal_handlers": False,  # ours stop it, and stop the restarts
    }
    if settings.reliable:
        stalled = database_url(settings.worker.backend)[1]
        options |= {"update_heartbeat_interval": stalled / 3, "stalled_worker_timeout": stalled}
    return options


async def _run(settings: FrameworkWorkerSettings, runtime: AsyncTaskRuntime) -> None:
    url = settings.worker.backend
    await ensure_schema(url)
    app = make_app(url, max_size=settings.worker.concurrency + 4)
    register_tasks(app, runtime, settings)
    options = worker_options(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    while True:
        async with app.open_async():
            worker = asyncio.create_task(app.run_worker_async(**options))
            stop = asyncio.create_task(stopping.wait())
            await asyncio.wait({worker, stop}, return_when=asyncio.FIRST_COMPLETED)
            if stopping.is_set():
                worker.cancel()  # Procrastinate's graceful stop: running jobs finish
                await asyncio.gather(worker, return_exceptions=True)
                return
            stop.cancel()
            error = worker.exception()
        # Unasked: a side task (listener, heartbeat, periodic deferrer) failed, and the
        # worker stopped itself, or a query raised out of it.
        if not settings.reliable:
            if error is not None:
                raise error
            return
        log.warning("Procrastinate's worker ended by itself (%r); starting it again", error)
        await asyncio.sleep(RESTART_AFTER_S)


def run_worker(settings: FrameworkWorkerSettings) -> None:
    worker = settings.worker
    options = worker_options(settings)
    print(
        f"mailbench procrastinate worker ({settings.config}): run_worker_async "
        f"concurrency={options['concurrency']} on {worker.queue_name}",
        flush=True,
    )

    async def main() -> None:
        runtime = AsyncTaskRuntime(worker)
        try:
            await _run(settings, runtime)
        finally:
            await runtime.aclose()
            runtime.write_metrics({"framework": describe(settings)})

    asyncio.run(main())


def describe(settings: FrameworkWorkerSettings) -> dict[str, object]:
    worker = settings.worker
    return {
        "name": "procrastinate",
        "config": settings.config,
        "pool": f"asyncio concurrency x {worker.concurrency} (one process)",
        "argv": ["procrastinate", "worker", "--queues", queue_of(worker.queue_name),
                 "--concurrency", str(worker.concurrency)],
    }  # fmt: skip


COUNT = """
SELECT count(*) AS n FROM procrastinate_jobs
WHERE queue_name = %(queue)s AND status IN ('todo', 'doing')
"""


class ProcrastinateDepth:
    """Jobs ``todo`` (waiting, or a retry waiting its time) and ``doing``."""

    def __init__(self, url: str, queue_name: str) -> None:
        self.app = make_app(url, min_size=1, max_size=1)
        self.queue_name = queue_of(queue_name)
        self._opened = False

    async def depth(self) -> int:
        try:
            if not self._opened:
                await self.app.open_async()
                self._opened = True
            row = await self.app.connector.execute_query_one_async(COUNT, queue=self.queue_name)
        except ConnectorException as exc:
            raise QueueError(f"the Procrastinate queue could not be counted: {exc!r}") from exc
        return int(row["n"])

    async def close(self) -> None:
        if self._opened:
            await self.app.close_async()


async def open_depth(url: str, queue_name: str) -> ProcrastinateDepth:
    return ProcrastinateDepth(url, queue_name)


add_cli_arguments = add_framework_worker_arguments  # the subcommand's options


def cli_main(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> int:
    return run_cli(run_worker, args, environ)
