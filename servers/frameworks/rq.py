"""RQ on Redis: enqueue, job function, worker pool.

``mailbench rq-worker --config default|reliable`` runs RQ's own ``WorkerPool`` (what
``rq worker-pool -n N`` starts) of :data:`MAX_WORKERS` workers at most (fewer if
``--concurrency`` is lower). Each RQ worker runs one job at a time in a *work-horse*, a
process it forks per job (RQ's default ``Worker``): 16 workers send 16 emails at once,
about 21 emails/s at 0.75 s per call, above the quick profile's ~12 sends/s.

Both configurations:

* the 2xx rests on the reply to RQ's enqueue pipeline (the job hash and the ``LPUSH``),
  with the broker's AOF as its durability; RQ offers nothing like a publisher confirm
  and needs none on Redis;
* retries with RQ's own ``Retry(max=4, interval=[1, 2, 4, 8])`` (five attempts in all, as
  mailbench's worker makes): RQ's intervals are fixed at enqueue, so a ``Retry-After``
  on a 5xx is not honoured (a 429's is: the job waits it out in place, as mailbench's
  worker does). The job id is the job's id, the idempotency key of every attempt;
* RQ's dead letter is its ``FailedJobRegistry``: a job whose last attempt failed, or
  that the API refused for good, is journaled as dead-lettered (with the reason) and
  then fails into it (its retries set to none left, so a refusal is not retried).

``reliable`` adds what keeps an accepted job from waiting out a crash: a worker killed
mid-job leaves the job in the ``StartedJobRegistry``; RQ retries it (it has retries
left) once its heartbeat has expired (60 s plus the job's monitoring interval) and a
worker's maintenance next cleans the registries. RQ does that every 10 minutes by
default; ``reliable`` does it every :data:`RELIABLE_MAINTENANCE_S` seconds, or the
URL's ``maintenance`` (chaos: 10 s), with a ``worker_ttl`` that lets an idle worker get
to it (see :class:`ReliableWorker`). The heartbeat's 60 s beyond the job monitoring
interval is fixed in RQ (``Worker.get_heartbeat_ttl``), so a killed job waits at least
that. ``default`` is RQ
as it ships: an email whose worker was killed comes back after 10 minutes or so.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import time
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any

from redis import Redis
from rq import Queue, Retry, Worker, get_current_job
from rq.worker_pool import WorkerPool

from queues.base import Job, encode_job
from servers.frameworks.task import (
    FrameworkWorkerSettings,
    RedisDepth,
    TaskRuntime,
    add_framework_worker_arguments,
    replay_journal,
    run_cli,
    strip_parameter,
)

log = logging.getLogger(__name__)

MAX_WORKERS = 16
RETRIES = 4
RETRY_INTERVALS = [1, 2, 4, 8]
RELIABLE_MAINTENANCE_S = 30
MAINTENANCE_PARAMETER = "maintenance"  # the mode's lease parameter (chaos shortens it)
STOP_GRACE_S = 20.0  # a job's longest call (10 s) and then some
JOB_FUNCTION = "servers.frameworks.rq.send_email"

# The worker pool's runtime, made before RQ forks its workers and their work-horses,
# which inherit it; each horse journals its figures, the pool's process adds them up.
_runtime: TaskRuntime | None = None


class DeadLettered(Exception):
    """The job gave up on its email; the dead letter is journaled."""


class RetryableSend(Exception):
    """The API call failed in a way a later attempt may not (RQ's Retry takes it)."""


def enqueue(queue: Queue, job: Job) -> None:
    """Enqueue the job (blocking: RQ has no async API); returns once Redis replied."""
    queue.enqueue(
        JOB_FUNCTION,
        encode_job(job).decode(),
        job_id=job.id,
        retry=Retry(max=RETRIES, interval=RETRY_INTERVALS),
    )


def send_email(payload: str) -> None:
    """The job function, run in a work-horse."""
    runtime = _runtime
    if runtime is None:
        raise RuntimeError("the RQ job ran outside mailbench's rq-worker")
    current = get_current_job()
    retries_left = current.retries_left if current is not None else None
    # A job without RQ retries has one attempt: its first failure is its last.
    last = runtime.settings.max_attempts - 1
    attempt = last - retries_left if retries_left is not None else last
    try:
        decision = runtime.deliver(payload, max(0, attempt))
    finally:
        runtime.flush()  # the horse ends with the job: its figures go to the journal
    if decision.action == "retry":
        raise RetryableSend(decision.reason)
    if decision.action == "dead":
        if current is not None:
            current.retries_left = 0  # into the FailedJobRegistry, not retried
        raise DeadLettered(decision.reason)


class ReliableWorker(Worker):
    """RQ's worker with its registries cleaned every :attr:`maintenance_s` seconds (30)
    instead of every 10 minutes.

    An idle RQ worker runs its maintenance only between blocking dequeues, each of which
    waits ``worker_ttl - 15`` seconds (405 by default): with an empty queue, a dead
    worker's job would wait that long whatever the interval. So ``worker_ttl`` (RQ's
    ``--worker-ttl``) is the interval plus those 15 s.
    """

    maintenance_s: float = RELIABLE_MAINTENANCE_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        interval = max(1, round(self.maintenance_s))
        kwargs.setdefault("maintenance_interval", interval)
        kwargs.setdefault("worker_ttl", interval + 15)
        super().__init__(*args, **kwargs)


def redis_url(url: str) -> tuple[str, float | None]:
    """The Redis URL without mailbench's ``maintenance`` parameter, and its seconds."""
    return strip_parameter(url, MAINTENANCE_PARAMETER)


class StoppingPool(WorkerPool):
    """RQ's pool, which on SIGTERM waits for its workers for :data:`STOP_GRACE_S` at most:
    seen here, a worker or two of sixteen sometimes never ends after the pool's SIGINT
    (idle ones: their jobs are done), and the pool would wait for them for ever."""

    stop_deadline = math.inf

    def request_stop(self, signum: Any = None, frame: Any = None) -> None:
        self.stop_deadline = time.monotonic() + STOP_GRACE_S
        super().request_stop(signum, frame)  # type: ignore[no-untyped-call]

    def all_workers_have_stopped(self) -> bool:
        if time.monotonic() > self.stop_deadline:
            for data in list(self.worker_dict.values()):
                if data.process.is_alive():
                    log.warning("RQ worker %d did not stop; killing it", data.pid)
                    with suppress(ProcessLookupError):
                        os.kill(data.pid, signal.SIGKILL)
        return bool(super().all_workers_have_stopped())


def events_path(metrics_out: Path | None) -> Path | None:
    """The journal beside the metrics file (``worker-0.json`` → ``worker-0.events.jsonl``),
    which the harness's ``worker-*.json`` never matches."""
    return metrics_out.with_suffix(".events.jsonl") if metrics_out is not None else None


def run_worker(settings: FrameworkWorkerSettings) -> None:
    global _runtime
    worker = settings.worker
    journal = events_path(worker.metrics_out)
    if journal is not None:
        journal.unlink(missing_ok=True)
    runtime = _runtime = TaskRuntime(worker, journal=journal)
    processes = min(MAX_WORKERS, worker.concurrency)
    url, maintenance = redis_url(worker.backend)
    worker_class: type[Worker] = Worker
    if settings.reliable:
        worker_class = type(
            "ReliableWorker",
            (ReliableWorker,),
            {"maintenance_s": maintenance or RELIABLE_MAINTENANCE_S},
        )
    print(
        f"mailbench rq worker ({settings.config}): WorkerPool of {processes} "
        f"{worker_class.__name__} on {worker.queue_name}",
        flush=True,
    )
    connection = Redis.from_url(url)
    pool = StoppingPool(
        [worker.queue_name], connection=connection, num_workers=processes, worker_class=worker_class
    )
    try:
        pool.start(logging_level="INFO")
    finally:
        if journal is not None and journal.is_file():
            replay_journal(runtime, journal.read_text().splitlines())
        runtime.write_metrics({"framework": describe(settings, processes, worker_class)})


def describe(settings: FrameworkWorkerSettings, processes: int, kind: type) -> dict[str, object]:
    return {
        "name": "rq",
        "config": settings.config,
        "pool": f"WorkerPool x {processes} ({kind.__name__}, a work-horse forked per job)",
        "argv": ["rq", "worker-pool", "-n", str(processes), settings.worker.queue_name],
    }


class RQDepth(RedisDepth):
    """Jobs queued, started (not finished) and scheduled (a retry waiting its interval)."""

    what = "the RQ queue"
    parameter = MAINTENANCE_PARAMETER

    async def count(self) -> int:
        name = self.queue_name
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(f"rq:queue:{name}")
            pipe.zcard(f"rq:wip:{name}")
            pipe.zcard(f"rq:scheduled:{name}")
            counts = await pipe.execute()
        return sum(int(c) for c in counts)


async def open_depth(url: str, queue_name: str) -> RQDepth:
    return RQDepth(url, queue_name)


add_cli_arguments = add_framework_worker_arguments  # the subcommand's options


def cli_main(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> int:
    return run_cli(run_worker, args, environ)
