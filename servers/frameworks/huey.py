"""Huey on a SQLite file (``SqliteHuey``): app, task, consumer.

``mailbench huey-worker --config default|reliable`` runs Huey's own ``Consumer`` (what
``huey_consumer app.huey -k thread -w N`` starts) in its process, with the thread worker
type and :data:`MAX_WORKERS` workers at most (fewer if ``--concurrency`` is lower): an
email is one blocking HTTP call, so 32 threads send 32 at once, about 42 emails/s at
0.75 s per call. Huey has no broker process: the queue is a SQLite file in the run's
folder (``sqlite:///{dir}/huey.db``), which the servers write and the consumers poll.

Both configurations:

* the 2xx rests on the commit of huey's ``INSERT`` into its ``task`` table (the
  enqueue is a blocking call: the sender runs it in a thread). Huey's SQLite storage
  shares one connection per process behind a lock, so a server's enqueues are one at a
  time whatever the number of threads;
* retries with huey's own ``retries=4`` and ``retry_delay`` (five attempts in all, as
  mailbench's worker makes): the task sets ``task.retry_delay`` to ``Retry-After`` when
  the API sent one, else to exponential backoff with full jitter, before raising, and
  huey schedules the retry that far ahead. Huey's ``RetryTask(delay=...)`` would take the
  delay too, but by design does not count against ``retries``, so a task raising it on
  every 5xx would never give up. A 429 is waited out in place, as mailbench's worker
  does. The task id is the job's id, the idempotency key of every attempt;
* huey has **no dead letter**: a failed task is only an error in its result store. A
  job the API refused for good, or whose last attempt failed, is journaled as
  dead-lettered (with the reason) and then fails with no retries left.

``reliable`` is what huey's docs recommend ("Deploying to Production", "Graceful
Shutdown and Re-enqueueing Interrupted Tasks"): durable writes (``fsync=True``), a
graceful stop on the supervisor's signal with time for running tasks to finish
(``graceful_signal="TERM"``, ``shutdown_timeout``), and a ``SIGNAL_INTERRUPTED`` handler
that enqueues again the tasks a shutdown interrupted. None of it helps a SIGKILLed
consumer: huey deletes a task's row when a worker takes it ("Huey does not guarantee
at-least-once delivery ... and does not do acknowledgement"), so what a killed consumer
was running is lost in both configurations. ``default`` is huey as it ships.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sqlite3
from collections.abc import Mapping
from typing import Any

from huey import SqliteHuey, signals
from huey.api import Task, TaskWrapper
from huey.constants import WORKER_THREAD

from queues.base import Job, encode_job
from queues.sqlite import sqlite_path
from servers.frameworks.task import (
    FrameworkWorkerSettings,
    TaskRuntime,
    add_framework_worker_arguments,
    run_cli,
)

log = logging.getLogger(__name__)

MAX_WORKERS = 32
RETRIES = 4
RETRY_DELAY_S = 1.0  # huey's default delay, which each failed attempt replaces
STOP_GRACE_S = 20.0  # a job's longest call (10 s) and then some
TASK_NAME = "send_email"  # huey's name for it: servers.frameworks.huey.send_email


class DeadLettered(Exception):
    """The task gave up on its email; the dead letter is journaled."""


class RetryableSend(Exception):
    """The API call failed in a way a later attempt may not (huey's retries take it)."""


def huey_settings(config: str) -> dict[str, Any]:
    """``SqliteHuey``'s keyword arguments for one configuration."""
    return {"fsync": True} if config == "reliable" else {}


def consumer_settings(config: str, workers: int) -> dict[str, Any]:
    """``Consumer``'s options (``huey_consumer``'s flags) for one configuration."""
    options: dict[str, Any] = {"workers": workers, "worker_type": WORKER_THREAD}
    if config == "reliable":
        options |= {"graceful_signal": "TERM", "shutdown_timeout": STOP_GRACE_S}
    return options


def make_huey(
    url: str, queue_name: str, config: str, runtime: TaskRuntime | None = None
) -> tuple[SqliteHuey, TaskWrapper]:
    """The app on the queue file of ``url`` and its task (which only a consumer, with a
    ``runtime``, runs); in ``reliable``, interrupted tasks are enqueued again."""
    huey = SqliteHuey(queue_name, filename=sqlite_path(url), **huey_settings(config))

    @huey.task(retries=RETRIES, retry_delay=RETRY_DELAY_S, context=True, name=TASK_NAME)  # type: ignore[untyped-decorator]
    def send_email(payload: str, task: Task) -> None:
        if runtime is None:
            raise RuntimeError("the huey task ran outside mailbench's huey-worker")
        run_task(runtime, payload, task)

    if config == "reliable":

        @huey.signal(signals.SIGNAL_INTERRUPTED)  # type: ignore[untyped-decorator]
        def enqueue_again(signal: str, task: Task, *args: Any, **kwargs: Any) -> None:
            log.warning("task %s was interrupted by the shutdown; enqueued again", task.id)
            huey.enqueue(task)

    return huey, send_email


def run_task(runtime: TaskRuntime, payload: str, task: Task) -> None:
    """One attempt, then what the runtime decided, with huey's own mechanism."""
    decision = runtime.deliver(payload, max(0, RETRIES - int(task.retries or 0)))
    if decision.action == "retry":
        task.retry_delay = decision.delay  # huey schedules the retry this far ahead
        raise RetryableSend(decision.reason)
    if decision.action == "dead":
        task.retries = 0  # a final failure, not retried
        raise DeadLettered(decision.reason)


def enqueue(send_email: TaskWrapper, job: Job) -> None:
    """Enqueue the job (blocking: huey has no async API); returns once SQLite committed."""
    send_email.huey.enqueue(send_email.s(encode_job(job).decode(), id=job.id))


def run_worker(settings: FrameworkWorkerSettings) -> None:
    """Huey's consumer until it stops (SIGTERM: at once in ``default``, gracefully within
    :data:`STOP_GRACE_S` in ``reliable``); then the metrics file."""
    worker = settings.worker
    runtime = TaskRuntime(worker)
    huey, _ = make_huey(worker.backend, worker.queue_name, settings.config, runtime)
    options = consumer_settings(settings.config, min(MAX_WORKERS, worker.concurrency))
    argv = consumer_argv(options)
    print(f"mailbench huey consumer ({settings.config}): {' '.join(argv)}", flush=True)
    try:
        huey.create_consumer(**options).run()
    finally:
        runtime.write_metrics({"framework": describe(settings, options, argv)})


def consumer_argv(options: Mapping[str, Any]) -> list[str]:
    """The ``huey_consumer`` command line that runs the same consumer."""
    argv = ["huey_consumer", "servers.frameworks.huey", "-k", str(options["worker_type"])]
    argv += ["-w", str(options["workers"])]
    if "graceful_signal" in options:
        argv += ["-g", str(options["graceful_signal"]), "-t", f"{options['shutdown_timeout']:g}"]
    return argv


def describe(
    settings: FrameworkWorkerSettings, options: Mapping[str, Any], argv: list[str]
) -> dict[str, object]:
    """What the manifest records of the framework's worker."""
    storage = ", ".join(f"{k}={v}" for k, v in huey_settings(settings.config).items())
    return {
        "name": "huey",
        "config": settings.config,
        "pool": f"{options['worker_type']} x {options['workers']}",
        "storage": f"SqliteHuey({storage})",
        "argv": argv,
    }


class HueyDepth:
    """Tasks waiting in huey's ``task`` table plus retries waiting in its ``schedule``
    (a task a worker took is in neither: huey deleted its row)."""

    def __init__(self, url: str, queue_name: str) -> None:
        self.path = sqlite_path(url)
        self.queue_name = queue_name

    def _count(self) -> int:
        with sqlite3.connect(self.path, timeout=5) as db:
            total = 0
            for table in ("task", "schedule"):
                try:
                    (count,) = db.execute(
                        f"SELECT count(*) FROM {table} WHERE queue = ?", (self.queue_name,)
                    ).fetchone()
                except sqlite3.OperationalError:  # no table yet: nothing was enqueued
                    count = 0
                total += int(count)
        return total

    async def depth(self) -> int:
        return await asyncio.to_thread(self._count)

    async def close(self) -> None:
        pass


async def open_depth(url: str, queue_name: str) -> HueyDepth:
    return HueyDepth(url, queue_name)


add_cli_arguments = add_framework_worker_arguments  # the subcommand's options


def cli_main(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> int:
    return run_cli(run_worker, args, environ)
