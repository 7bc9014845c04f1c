"""Celery on Redis or RabbitMQ (the broker URL's scheme says which): app, task, worker.

``mailbench celery-worker --config default|reliable`` is ``celery worker`` itself: it
builds the app below and runs Celery's own worker (``app.worker_main``) in its process,
as ``celery -A ... worker --pool threads --concurrency N -Q <queue>`` would.

Both configurations:

* the **threads pool** with ``--concurrency`` threads (the harness's worker concurrency):
  an email is one blocking HTTP call, and Celery's docs advise a thread or greenlet pool
  for I/O-bound tasks; the prefork default (one process per core, 2 here) sends about
  2.7 emails/s at 0.75 s per call;
* **publisher confirms** on RabbitMQ (``broker_transport_options={"confirm_publish":
  True}``): without them ``apply_async`` returns once the message is written to the
  socket, and the server's 2xx would promise nothing. On Redis the ``LPUSH`` reply is the
  acceptance (and the broker's AOF its durability);
* JSON, no result backend (``task_ignore_result``): a send has no result to read;
* retries with Celery's own ``self.retry(countdown=...)``: the delay is ``Retry-After``
  when the API sent one, else exponential backoff with full jitter; the task id is the
  job id, the idempotency key of every attempt. Celery has no dead letter of its own
  (a failed task is only a FAILURE state, in a result backend if there is one): the final
  failure is appended to mailbench's dead-letters journal, then the task fails.

``reliable`` adds what Celery's docs recommend so that an accepted job survives a worker
killed mid-task and a broker restart: ``task_acks_late`` (ack after the task, not before
it starts), ``task_reject_on_worker_lost`` (a task whose worker process died is requeued,
not acked), ``worker_prefetch_multiplier=1`` (a worker holds no more than it runs), and
on Redis a ``visibility_timeout`` (how long an unacknowledged message waits before
another worker gets it) of :data:`RELIABLE_VISIBILITY_S` or the URL's ``visibility``
parameter, instead of an hour, swept for every few seconds rather than kombu's 100 s
(``unacked_restore_interval``, ``unacked_restore_throttle``), with the sweep's lock held
for that long at most (``unacked_mutex_expire``, 300 s as kombu ships: a worker killed
holding it stopped every sweep for five minutes). ``default`` is Celery as
it ships: it acks a message when its task *starts*, so a worker killed mid-send loses
that email, and on Redis the prefetched messages of a dead worker come back only after
an hour.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from celery import Celery, Task

from queues.base import Job, encode_job
from queues.errors import ConfigError
from queues.rabbitmq import AmqpDepth
from servers.frameworks.task import (
    TASK_NAME,
    FrameworkWorkerSettings,
    RedisDepth,
    TaskRuntime,
    add_framework_worker_arguments,
    run_cli,
    strip_parameter,
)

log = logging.getLogger(__name__)

RELIABLE_VISIBILITY_S = 300.0  # above the longest retry countdown (backoff cap 30 s)
VISIBILITY_PARAMETER = "visibility"  # the mode's lease parameter on Redis
POOL = "threads"


class DeadLettered(Exception):
    """The task gave up on its email; the dead letter is journaled."""


def celery_settings(broker_url: str, queue_name: str, config: str) -> dict[str, Any]:
    """The app's settings for one configuration (see the module's docstring)."""
    url, visibility = strip_parameter(broker_url, VISIBILITY_PARAMETER)
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "amqp", "amqps"):
        raise ConfigError(f"Celery modes take a redis:// or amqp:// URL, not {scheme}://")
    transport: dict[str, Any] = {}
    if scheme.startswith("amqp"):
        transport["confirm_publish"] = True  # the 2xx promise, in both configurations
    settings: dict[str, Any] = {
        "broker_url": url,
        "task_default_queue": queue_name,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
    }
    if config == "reliable":
        settings |= {
            "task_acks_late": True,
            "task_reject_on_worker_lost": True,
            "worker_prefetch_multiplier": 1,
        }
        if scheme.startswith("redis"):
            visibility = visibility or RELIABLE_VISIBILITY_S
            sweep_every = max(1, min(10, round(visibility / 2)))
            transport |= {
                "visibility_timeout": visibility,
                # kombu sweeps for messages past their visibility every 10 s x 10 polls
                # (100 s), whatever the timeout; its docs: lower the interval and set
                # the throttle to 1 with a low visibility_timeout.
                "unacked_restore_interval": sweep_every,
                "unacked_restore_throttle": 1,
                # A sweep holds a lock in Redis (10 restores take milliseconds) that
                # expires after 300 s as kombu ships: a worker killed while it holds it,
                # or a Redis crash that kept the lock and lost its release, stops every
                # worker's sweep for that long. One sweep interval is enough.
                "unacked_mutex_expire": sweep_every,
            }
    settings["broker_transport_options"] = transport
    return settings


def make_app(broker_url: str, queue_name: str, config: str) -> Celery:
    app = Celery("mailbench", set_as_current=False)
    app.conf.update(celery_settings(broker_url, queue_name, config))
    return app


def publish(app: Celery, job: Job) -> None:
    """Enqueue the job (blocking: Celery's ``apply_async`` has no async API). Returns once
    the broker took it: the Redis reply, or the RabbitMQ publisher confirm."""
    app.send_task(TASK_NAME, args=[encode_job(job).decode()], task_id=job.id)


def register_task(app: Celery, runtime: TaskRuntime) -> Task:
    """The task the worker runs: one send, then what the runtime decided, carried out
    with Celery's own mechanism."""

    @app.task(name=TASK_NAME, bind=True, max_retries=None)  # type: ignore[untyped-decorator]
    def send_email(self: Task, payload: str) -> None:
        decision = runtime.deliver(payload, int(self.request.retries or 0))
        if decision.action == "retry":
            raise self.retry(countdown=decision.delay)
        if decision.action == "dead":
            raise DeadLettered(decision.reason)

    return send_email


def worker_argv(settings: FrameworkWorkerSettings) -> list[str]:
    """``celery worker``'s options for these settings."""
    return [
        "worker",
        "--pool", POOL,
        "--concurrency", str(settings.worker.concurrency),
        "--queues", settings.worker.queue_name,
        "--hostname", f"mailbench-{os.getpid()}@%h",
        "--loglevel", "INFO",
    ]  # fmt: skip


def run_worker(settings: FrameworkWorkerSettings) -> None:
    """Celery's worker, until it shuts down (SIGTERM: a warm shutdown that lets running
    tasks finish); then the metrics file."""
    worker = settings.worker
    app = make_app(worker.backend, worker.queue_name, settings.config)
    runtime = TaskRuntime(worker)
    register_task(app, runtime)
    argv = worker_argv(settings)
    print(f"mailbench celery worker ({settings.config}): celery {' '.join(argv)}", flush=True)
    try:
        app.worker_main(argv)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise
    finally:
        runtime.write_metrics({"framework": describe(settings, argv)})


def describe(settings: FrameworkWorkerSettings, argv: list[str]) -> dict[str, object]:
    """What the manifest records of the framework's worker."""
    return {
        "name": "celery",
        "config": settings.config,
        "pool": f"{POOL} x {settings.worker.concurrency}",
        "argv": ["celery", *argv],
    }


class CeleryDepth(RedisDepth):
    """Messages waiting in the Redis list of the queue plus those delivered and not yet
    acknowledged (kombu's ``unacked`` hash; a retry waiting out its countdown is held
    there by a worker)."""

    what = "the Celery queue"
    parameter = VISIBILITY_PARAMETER

    async def count(self) -> int:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(self.queue_name)
            pipe.hlen("unacked")
            waiting, unacked = await pipe.execute()
        return int(waiting) + int(unacked)


async def open_depth(url: str, queue_name: str) -> CeleryDepth | AmqpDepth:
    if urlsplit(url).scheme.startswith("amqp"):
        return AmqpDepth(url, (queue_name,))
    return CeleryDepth(url, queue_name)


add_cli_arguments = add_framework_worker_arguments  # the subcommand's options


def cli_main(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> int:
    return run_cli(run_worker, args, environ)
