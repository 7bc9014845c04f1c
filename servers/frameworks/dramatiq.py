"""Dramatiq on RabbitMQ or Redis (the broker URL's scheme says which): broker, actor, worker.

``mailbench dramatiq-worker --config default|reliable`` is the ``dramatiq`` command itself:
it runs Dramatiq's CLI (``dramatiq.cli.main``: a main process that forks its worker
processes, each running Dramatiq's ``Worker`` with its threads), as
``dramatiq servers.frameworks.dramatiq:setup_worker --processes 1 --threads N -Q <queue>``
would. One worker process per ``mailbench dramatiq-worker``, so that each writes its own
metrics file; the harness's ``--worker-procs`` starts more of them.

Both configurations:

* **threads**: ``--threads`` is the harness's concurrency, at most :data:`MAX_THREADS`
  (Dramatiq's default is 8 per process, one process per core): an email is one blocking
  HTTP call, and 32 threads send about 42 emails/s at 0.75 s per call;
* **publisher confirms** on RabbitMQ (``RabbitmqBroker(confirm_delivery=True)``, off by
  default): without them ``send`` returns once the message is written to the socket,
  and the 202 would promise nothing. On Redis the reply to Dramatiq's enqueue script
  (``HSET`` + ``RPUSH`` in one Lua call) is the acceptance, and the AOF its durability;
* acks after the actor ran: Dramatiq's default on both brokers, nothing to set;
* retries with Dramatiq's own ``Retries`` middleware: the actor raises
  ``dramatiq.Retry(delay=…)`` with the runtime's delay (``Retry-After`` when the API sent
  one, else exponential backoff with full jitter), ``max_retries`` four (five attempts, as
  mailbench's worker makes) and ``min_backoff``/``max_backoff`` from the worker's backoff
  settings for anything else the actor raises. The message id is the job id, the
  idempotency key of every attempt (a retry is the same message, re-enqueued);
* Dramatiq's dead letter is its ``<queue>.XQ`` (a RabbitMQ queue; on Redis the sorted set
  ``dramatiq:<queue>.XQ``): a message whose actor raised :class:`DeadLettered` (a
  refusal, or the last attempt failed: the actor's ``throws``) is journaled as
  dead-lettered, with the reason, and then failed into it by ``Retries``. (``<queue>.DQ``
  is Dramatiq's *delay* queue, where retries wait out their backoff.)

``reliable`` adds what Dramatiq's docs and its source suggest for jobs that must not be
lost:

* ``AgeLimit(max_age=1 h)``: a message older than that is failed into the dead-letter
  queue rather than sent hours late (journaled as dead-lettered, never lost); Dramatiq
  ships ``AgeLimit`` with no limit;
* on Redis, how soon a dead worker's messages come back. A worker's fetched,
  unacknowledged messages sit in its ack set; they are pushed back onto the queue by
  "maintenance" that runs on a random 0.1 % of broker commands
  (``maintenance_chance=1000`` in a million), for workers whose last command is older
  than ``heartbeat_timeout`` (60 s). ``reliable`` runs maintenance on 10 % of commands
  (:data:`RELIABLE_MAINTENANCE_CHANCE`) and takes the heartbeat timeout from the URL's
  ``heartbeat`` parameter (seconds; chaos sets 10), else Dramatiq's 60 s. ``default``
  is Dramatiq as it ships: a killed worker's prefetched messages (up to twice its
  threads) come back only when maintenance happens to run, seconds to many minutes later.
* **Redis restarts ridden out** (on Redis): the broker's redis-py client retries a
  command that found Redis down or still loading its data, for up to ~30 s
  (:func:`riding_out_restarts`). Dramatiq's ``Retries`` enqueues a retry as a new
  message, then acks the failed one whatever became of that enqueue: in a chaos run as
  shipped, five retries due while Redis restarted were refused (``BusyLoadingError``,
  logged as "Unexpected failure in after_process_message") and lost.

Neither changes ``worker_timeout`` (1 s): the Redis consumer, finding its queue empty,
sleeps with exponential backoff up to that before it looks again, which is most of
Dramatiq-on-Redis's delivery lag at a low rate. That is delay, not loss; ``reliable`` is
about loss, so both run it as Dramatiq ships.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from collections.abc import Mapping
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import dramatiq
import dramatiq.cli
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import AgeLimit, CurrentMessage, Middleware, Retries, default_middleware

from queues.base import Job, decode_job, encode_job
from queues.errors import ConfigError, InvalidJob
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

MAX_THREADS = 32
REDIS_RETRIES, REDIS_RETRY_CAP_S = 30, 1.0  # reliable rides out ~30 s of Redis away
HEARTBEAT_PARAMETER = "heartbeat"  # the mode's lease parameter on Redis (seconds)
RELIABLE_MAINTENANCE_CHANCE = 100_000  # in a million commands (Dramatiq's: 1,000)
RELIABLE_MAX_AGE_MS = 3_600_000
SHUTDOWN_TIMEOUT_MS = 20_000  # the harness SIGKILLs a worker still running after 30 s


class DeadLettered(Exception):
    """The actor gave up on its email; the dead letter is journaled."""


def make_middleware(config: str, retries: Retries | None = None) -> list[Middleware]:
    """Dramatiq's default middleware, with ``retries`` instead of its ``Retries`` and, in
    ``reliable``, an age limit."""
    middleware: list[Middleware] = []
    for kind in default_middleware:
        if kind is Retries and retries is not None:
            middleware.append(retries)
        elif kind is AgeLimit and config == "reliable":
            middleware.append(AgeLimit(max_age=RELIABLE_MAX_AGE_MS))
        else:
            middleware.append(kind())
    return middleware


def riding_out_restarts(url: str) -> Any:
    """A redis-py client that retries a command refused by a Redis restarting (no
    connection, or still loading its data) for up to :data:`REDIS_RETRIES` ×
    :data:`REDIS_RETRY_CAP_S`, with redis-py's own ``Retry``. Dramatiq's ``Retries``
    re-enqueues a retry as a new message and then acks the one that failed, whatever
    became of that enqueue: without this, a retry due while Redis restarts is lost."""
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError
    from redis.retry import Retry

    return redis.Redis.from_url(
        url,
        retry=Retry(ExponentialBackoff(cap=REDIS_RETRY_CAP_S, base=0.05), REDIS_RETRIES),
        retry_on_error=[BusyLoadingError, ConnectionError, TimeoutError],
    )


def make_broker(
    url: str, config: str, middleware: list[Middleware] | None = None
) -> dramatiq.Broker:
    """The broker for one configuration (see the module's docstring)."""
    url, heartbeat = strip_parameter(url, HEARTBEAT_PARAMETER)
    scheme = urlsplit(url).scheme
    middleware = make_middleware(config) if middleware is None else middleware
    if scheme in ("amqp", "amqps"):
        return RabbitmqBroker(url=url, confirm_delivery=True, middleware=middleware)
    if scheme in ("redis", "rediss"):
        options: dict[str, Any] = {}
        if config != "reliable":
            return RedisBroker(url=url, middleware=middleware)  # type: ignore[no-untyped-call]
        options["maintenance_chance"] = RELIABLE_MAINTENANCE_CHANCE
        if heartbeat is not None:
            options["heartbeat_timeout"] = int(heartbeat * 1000)
        return RedisBroker(client=riding_out_restarts(url), middleware=middleware, **options)  # type: ignore[no-untyped-call]
    raise ConfigError(f"Dramatiq modes take an amqp:// or redis:// URL, not {scheme}://")


def declare_actor(broker: dramatiq.Broker, queue_name: str, fn: Any, **options: Any) -> Any:
    decorate = dramatiq.actor(actor_name=TASK_NAME, queue_name=queue_name, broker=broker, **options)
    return decorate(fn)


def _not_here(payload: str) -> None:
    raise RuntimeError("the Dramatiq actor runs in mailbench dramatiq-worker only")


def sender_actor(broker: dramatiq.Broker, queue_name: str) -> Any:
    """The actor as the server knows it: only to build its messages."""
    return declare_actor(broker, queue_name, _not_here)


def publish(actor: Any, job: Job) -> None:
    """Enqueue the job (blocking: Dramatiq has no async ``send``), with the job id as the
    message id. Returns once the broker took it: the Redis reply, or the RabbitMQ
    publisher confirm."""
    message = actor.message(encode_job(job).decode()).copy(message_id=job.id)
    actor.broker.enqueue(message)


def make_actor_function(runtime: TaskRuntime) -> Any:
    """The actor the worker runs: one send, then what the runtime decided, carried out
    with Dramatiq's ``Retries``."""

    def send_email(payload: str) -> None:
        message = CurrentMessage.get_current_message()
        attempt = int(message.options.get("retries", 0)) if message is not None else 0
        decision = runtime.deliver(payload, attempt)
        if decision.action == "retry":
            raise dramatiq.Retry(decision.reason, delay=int(decision.delay * 1000))
        if decision.action == "dead":
            raise DeadLettered(decision.reason)

    return send_email


class WorkerFigures(Middleware):
    """The worker process's side of mailbench: journals a message ``AgeLimit`` skipped,
    writes the metrics file once Dramatiq's worker has shut down, and lets the first
    SIGTERM through only (see :meth:`after_worker_boot`)."""

    def __init__(self, runtime: TaskRuntime, described: dict[str, object]) -> None:
        self.runtime = runtime
        self.described = described

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        try:
            job = decode_job(message.args[0])
        except (InvalidJob, IndexError):
            return
        self.runtime.give_up(job, "older than the age limit (AgeLimit)")

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        # The harness stops a worker by signalling its process group, and Dramatiq's main
        # process forwards the SIGTERM to its worker process: a second SIGTERM, which
        # Dramatiq takes for "kill now". Only the first reaches Dramatiq's handler, so
        # the worker finishes its messages and requeues the rest.
        handler = signal.getsignal(signal.SIGTERM)
        if not callable(handler):
            return  # not Dramatiq's CLI (a Worker of a test)
        seen = False

        def first_only(signum: int, frame: FrameType | None) -> None:
            nonlocal seen
            if not seen:
                seen = True
                handler(signum, frame)

        signal.signal(signal.SIGTERM, first_only)

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        self.runtime.write_metrics({"framework": self.described})


# Set in `mailbench dramatiq-worker` before Dramatiq's CLI forks its worker process, which
# inherits it and builds its broker from it in setup_worker.
_settings: FrameworkWorkerSettings | None = None


def threads_for(settings: FrameworkWorkerSettings) -> int:
    return max(1, min(MAX_THREADS, settings.worker.concurrency))


def worker_retries(settings: FrameworkWorkerSettings) -> Retries:
    """Dramatiq's ``Retries`` for mailbench's attempts and backoff (the delay of anything
    the actor raises other than the runtime's ``Retry``)."""
    worker = settings.worker
    return Retries(
        max_retries=worker.max_attempts - 1,
        min_backoff=max(1, int(worker.backoff_base * 1000)),
        max_backoff=max(1, int(worker.backoff_cap * 1000)),
    )


def declare_worker_actor(
    broker: dramatiq.Broker, settings: FrameworkWorkerSettings, runtime: TaskRuntime
) -> Any:
    """The worker's middleware of its own and the actor, on ``broker``."""
    broker.add_middleware(CurrentMessage())
    broker.add_middleware(WorkerFigures(runtime, describe(settings)))
    return declare_actor(
        broker, settings.worker.queue_name, make_actor_function(runtime), throws=(DeadLettered,)
    )


def setup_worker() -> None:
    """The broker Dramatiq's worker process imports (``module:callable``): the runtime,
    the broker with mailbench's ``Retries``, the actor."""
    settings = _settings
    if settings is None:
        raise RuntimeError("the Dramatiq worker process was not forked by mailbench")
    middleware = make_middleware(settings.config, worker_retries(settings))
    broker = make_broker(settings.worker.backend, settings.config, middleware)
    declare_worker_actor(broker, settings, TaskRuntime(settings.worker))
    dramatiq.set_broker(broker)


def cli_argv(settings: FrameworkWorkerSettings) -> list[str]:
    """The ``dramatiq`` command's arguments for these settings."""
    return [
        f"{__name__}:setup_worker",
        "--processes", "1",
        "--threads", str(threads_for(settings)),
        "--queues", settings.worker.queue_name,
        "--worker-shutdown-timeout", str(SHUTDOWN_TIMEOUT_MS),
    ]  # fmt: skip


def describe(settings: FrameworkWorkerSettings) -> dict[str, object]:
    """What the manifest records of the framework's worker."""
    return {
        "name": "dramatiq",
        "config": settings.config,
        "pool": f"1 process x {threads_for(settings)} threads",
        "argv": ["dramatiq", *cli_argv(settings)],
    }


def run_worker(settings: FrameworkWorkerSettings) -> None:
    """Dramatiq's CLI, until it shuts down (SIGTERM: its worker finishes the messages it
    runs and requeues those it holds); its worker process writes the metrics file."""
    global _settings
    _settings = settings
    argv = cli_argv(settings)
    print(f"mailbench dramatiq worker ({settings.config}): dramatiq {' '.join(argv)}", flush=True)
    parser = dramatiq.cli.make_argument_parser()  # type: ignore[no-untyped-call]
    code = dramatiq.cli.main(parser.parse_args(argv))  # type: ignore[no-untyped-call]
    if code not in (0, None):
        raise SystemExit(code)


class DramatiqRedisDepth(RedisDepth):
    """Messages not yet acknowledged: Dramatiq keeps each one in the queue's hash (and a
    retry in its delay queue's) from enqueue to ack, waiting, prefetched or running."""

    what = "the Dramatiq queue"
    parameter = HEARTBEAT_PARAMETER

    @property
    def keys(self) -> tuple[str, str]:
        return f"dramatiq:{self.queue_name}.msgs", f"dramatiq:{self.queue_name}.DQ.msgs"

    async def count(self) -> int:
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in self.keys:
                pipe.hlen(key)
            counts = await pipe.execute()
        return sum(int(c) for c in counts)


async def open_depth(url: str, queue_name: str) -> DramatiqRedisDepth | AmqpDepth:
    if urlsplit(url).scheme.startswith("amqp"):
        return AmqpDepth(url, (queue_name, f"{queue_name}.DQ"))  # and its delay queue
    return DramatiqRedisDepth(url, queue_name)


add_cli_arguments = add_framework_worker_arguments  # the subcommand's options


def cli_main(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> int:
    return run_cli(run_worker, args, environ)
