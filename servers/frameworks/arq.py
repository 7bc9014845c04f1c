"""arq on Redis: enqueue, task coroutine, worker.

arq needs redis-py < 6 and Celery's Redis transport redis-py >= 6.4, so arq's modes run
their servers and workers in a venv of their own (``.venv-arq``, the mode's ``python``
in :mod:`servers.modes`); arq is imported only inside the functions that use it, so the
harness, which counts the queue with :func:`open_depth`, never needs it.

``mailbench arq-worker --config default|reliable`` runs arq's own ``Worker`` (what the
``arq`` CLI starts, through ``arq.worker.run_worker``) with the task coroutine below:
one process, one event loop, up to ``max_jobs`` = ``--concurrency`` jobs at once (arq's
default is 10; a send is one awaited HTTP call, so the harness's 200 is what keeps up).

Both configurations:

* the handler awaits ``ArqRedis.enqueue_job`` (arq's own async API: no thread) with
  ``_job_id`` = the job's id, which arq uses to refuse a second job of that id; the 2xx
  rests on the reply of its ``MULTI``/``EXEC`` (the job key and the queue's sorted set),
  the broker's AOF its durability. arq offers nothing like a publisher confirm and needs
  none on Redis;
* the task sends with the project's async Mailgun client (:class:`AsyncTaskRuntime`);
  the job id is the idempotency key of every attempt;
* retries with arq's ``Retry(defer=...)``: ``Retry-After`` where the API sent one, else
  exponential backoff with full jitter (a 429 is waited out in place first, as
  mailbench's worker does); ``max_tries`` bounds them;
* arq has **no dead letter**: a job that fails is only a failed result kept for
  ``keep_result`` seconds. The task appends the final failure to mailbench's
  dead-letters journal (as every framework's task does), then fails.

arq runs jobs *pessimistically*: a job stays in the queue's sorted set until it has
finished, and a worker marks the job it runs with an ``in-progress`` key that expires
after the longest ``job_timeout`` plus 10 s. A worker that stops (SIGTERM) cancels its
jobs and they run again at once; a worker that is killed leaves its in-progress keys,
and its jobs run again on another worker once they expire. arq's docs ask for jobs
that are idempotent for that reason (ours are: the idempotency key). Each start counts
as a try, a killed one too; a job whose tries are used up is failed by arq without the
task running (``max retries exceeded``), so no dead letter is written for it.

* ``default`` — arq as it ships: ``job_timeout`` 300 s, so a killed worker's jobs wait
  310 s before they run again (longer than chaos's drain: they count as lost), and
  ``max_tries`` 5 (= mailbench's attempts), so a job killed on its last try is lost.
* ``reliable`` — ``job_timeout`` :data:`RELIABLE_JOB_TIMEOUT_S` (above the longest send:
  the client's 10 s timeout and a few 429 waits; a job running longer is cancelled and
  failed by arq), so a killed worker's jobs come back after 70 s, and
  :data:`SPARE_TRIES` more tries than attempts, so a job killed on its last try runs
  again rather than being failed unsent (the task's count, from ``job_try``, still
  includes the crashed starts: it gives up after five failed tries of any kind).

In both, arq's worker exits when Redis restarts (its poll raises ``ConnectionError``);
a supervisor (here the harness) starts another, and the dead one's jobs wait for their
in-progress keys as a killed worker's do.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from queues.base import Job, encode_job
from servers.frameworks.task import (
    TASK_NAME,
    AsyncTaskRuntime,
    FrameworkWorkerSettings,
    RedisDepth,
    add_framework_worker_arguments,
    run_cli,
)

if TYPE_CHECKING:
    from arq.connections import ArqRedis, RedisSettings

log = logging.getLogger(__name__)

DEFAULT_JOB_TIMEOUT_S = 300.0  # arq's
RELIABLE_JOB_TIMEOUT_S = 60.0
IN_PROGRESS_EXTRA_S = 10.0  # arq's in-progress key lives job_timeout + 10 s
SPARE_TRIES = 5  # reliable: one per worker chaos kills, beyond mailbench's attempts


class DeadLettered(Exception):
    """The job gave up on its email; the dead letter is journaled."""


def redis_settings(url: str) -> RedisSettings:
    """arq's connection settings from a ``redis://`` URL (``from_dsn`` leaves the user
    and password percent-encoded)."""
    from arq.connections import RedisSettings

    settings = RedisSettings.from_dsn(url)
    if settings.username:
        settings.username = unquote(settings.username)
    if settings.password:
        settings.password = unquote(settings.password)
    return settings


async def open_pool(url: str, queue_name: str) -> ArqRedis:
    from arq import create_pool

    return await create_pool(redis_settings(url), default_queue_name=queue_name)


async def enqueue(pool: ArqRedis, job: Job) -> None:
    """Enqueue the job with arq's async API; returns once Redis replied. arq answers None
    for a job id it already holds: that job is queued, so it is accepted all the same."""
    await pool.enqueue_job(TASK_NAME, encode_job(job).decode(), _job_id=job.id)


def worker_options(settings: FrameworkWorkerSettings) -> dict[str, Any]:
    """arq's ``Worker`` options for these settings (see the module's docstring)."""
    attempts = settings.worker.max_attempts
    reliable = settings.reliable
    return {
        "queue_name": settings.worker.queue_name,
        "max_jobs": settings.worker.concurrency,
        "job_timeout": RELIABLE_JOB_TIMEOUT_S if reliable else DEFAULT_JOB_TIMEOUT_S,
        "max_tries": attempts + SPARE_TRIES if reliable else attempts,
    }


def attempt_of(job_try: int, max_attempts: int) -> int:
    """The runtime's attempt (0: the first) from arq's ``job_try`` (1: the first start).
    Starts beyond mailbench's attempts (crashed ones, in ``reliable``) are its last."""
    return max(0, min(job_try - 1, max_attempts - 1))


async def send_email(ctx: dict[str, Any], payload: str) -> None:
    """The task coroutine: one send, then what the runtime decided, with arq's ``Retry``."""
    from arq import Retry

    runtime: AsyncTaskRuntime = ctx["runtime"]
    decision = await runtime.deliver_async(
        payload, attempt_of(int(ctx.get("job_try") or 1), runtime.settings.max_attempts)
    )
    if decision.action == "retry":
        raise Retry(defer=decision.delay)
    if decision.action == "dead":
        raise DeadLettered(decision.reason)


def run_worker(settings: FrameworkWorkerSettings) -> None:
    """arq's worker until SIGTERM (it cancels the running jobs, which stay queued); then
    the metrics file."""
    from arq import func
    from arq.worker import run_worker as arq_run_worker

    worker = settings.worker
    runtime = AsyncTaskRuntime(worker)
    options = worker_options(settings)

    async def on_startup(ctx: dict[str, Any]) -> None:
        ctx["runtime"] = runtime

    async def on_shutdown(ctx: dict[str, Any]) -> None:
        await runtime.aclose()

    task = func(send_email, name=TASK_NAME, max_tries=options.pop("max_tries"))
    print(f"mailbench arq worker ({settings.config}): arq Worker {options}", flush=True)

    # arq's WorkerSettings, as the ``arq`` CLI would take them from a module.
    worker_settings = type(
        "WorkerSettings",
        (),
        {
            "functions": [task],
            "redis_settings": redis_settings(worker.backend),
            "on_startup": on_startup,
            "on_shutdown": on_shutdown,
            **options,
        },
    )
    started = time.monotonic()
    try:
        arq_run_worker(worker_settings)
    except asyncio.CancelledError:
        # arq's close() cancels the running jobs and gathers them; a job cancelled while
        # it settles raises out of run(). Its in-progress key stays: it runs again later.
        log.warning("arq's worker stopped with a job cancelled while it settled")
    finally:
        log.info("arq worker ran %.0f s", time.monotonic() - started)
        runtime.write_metrics({"framework": describe(settings)})


def describe(settings: FrameworkWorkerSettings) -> dict[str, object]:
    """What the manifest records of the framework's worker."""
    from importlib.metadata import version

    options = worker_options(settings)
    return {
        "name": "arq",
        "config": settings.config,
        "versions": {"arq": version("arq"), "redis": version("redis")},  # its venv's
        "pool": f"asyncio, max_jobs {options['max_jobs']} (one event loop)",
        "job_timeout_s": options["job_timeout"],
        "max_tries": options["max_tries"],
        "runs": "arq.worker.run_worker(WorkerSettings)",
    }


class ArqDepth(RedisDepth):
    """Jobs in the queue's sorted set: waiting, running (arq keeps them there until they
    finish) and deferred retries. redis-py only, so the harness needs no arq."""

    what = "the arq queue"

    async def count(self) -> int:
        return int(await self.redis.zcard(self.queue_name))


async def open_depth(url: str, queue_name: str) -> ArqDepth:
    return ArqDepth(url, queue_name)


add_cli_arguments = add_framework_worker_arguments  # the subcommand's options


def cli_main(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> int:
    return run_cli(run_worker, args, environ)
