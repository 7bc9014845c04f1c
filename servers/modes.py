"""The modes of the reference server: one declaration each, and nothing else knows them.

A mode is one way for ``POST /send`` to let an email leave. Its entry here holds all
that the server, the harness, the report, the gate, chaos and the tests need to know:

* ``kind`` — :attr:`Kind.IN_REQUEST` (the handler calls the API and answers after it),
  :attr:`Kind.QUEUED` (the handler hands a job to a broker; workers send it) or
  :attr:`Kind.BACKGROUND` (the handler starts a task of its own process that sends, and
  answers at once: no broker, no workers; what is in flight lives in that process only);
* ``sender`` — ``"module:Class"`` of the code that sends or enqueues in the handler
  (a :class:`servers.senders.base.Sender`, opened by
  :func:`servers.senders.base.open_sender`), imported only when the mode is served, so
  serving one mode never needs another's driver;
* ``service`` — the broker :mod:`harness.services` starts for it (``None``: none), or
  ``queue_file`` — the URL of a queue kept in a file of the run's folder (``{dir}``);
* ``worker`` — the ``mailbench`` subcommand that runs its workers (``None``: no workers);
* ``worker_args`` — options its workers get after the harness's own (a framework mode's
  configuration, ``--config reliable``);
* ``lease_parameter`` — the queue URL's parameter that sets how soon a dead worker's
  jobs come back (chaos shortens it; ``None``: the broker notices at once);
* ``framework`` and ``config`` — for a task-queue framework's mode (Celery, RQ, ...),
  the framework and which of its configurations runs: ``default`` (the framework as
  it ships) or ``reliable`` (what its docs recommend so that no accepted job is lost);
  ``depth`` — ``"module:function"`` that opens its queue-depth probe (see
  :mod:`servers.frameworks`). Framework modes run with ``--modes frameworks``, not by
  default;
* ``retries`` — False for a mode that never tries a failed send again (``naive``): the
  drain then stops waiting for its lost emails once nothing can still arrive;
* ``shortcut`` — a design that looks as fast as a queue but loses mail by construction
  (``background``, ``naive``): it runs with ``--modes shortcuts``, not by default;
* ``python`` — the virtualenv its servers and workers run in, ``.venv-<python>`` beside
  the project's ``.venv`` (``make install`` makes it from the optional dependency group
  of that name), for a framework whose dependencies cannot share the harness's (arq
  pins redis-py < 6); ``None``: the harness's own interpreter;
* how reports show it: ``title`` (in a sentence), ``colour`` and ``linestyle`` (in
  charts, the Okabe–Ito palette), ``explanation`` (one line in the report).

Adding a mode is one file that implements it (a sender here, or a queue backend in
``queues/``) plus one entry below; ``docs/adding-a-mode.md`` has the steps.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from queues.errors import ConfigError


class Kind(enum.Enum):
    IN_REQUEST = "in-request"  # the reply waits for the API: send time ≈ API latency
    QUEUED = "queued"  # the reply waits for the broker; workers call the API
    BACKGROUND = "background"  # the reply comes first; a task of the server process sends


@dataclass(frozen=True, slots=True)
class Mode:
    name: str
    kind: Kind
    sender: str
    title: str
    explanation: str
    colour: str
    linestyle: str = "-"
    service: str | None = None
    queue_file: str | None = None
    worker: str | None = None
    worker_args: tuple[str, ...] = ()
    lease_parameter: str | None = None
    blocks_event_loop: bool = False  # one slow call stalls every request of the process
    framework: str | None = None  # a task-queue framework's mode: "celery", "rq", ...
    config: str | None = None  # its configuration: "default" or "reliable"
    depth: str | None = None  # "module:function" opening its depth probe (None: queues')
    python: str | None = None  # its servers' and workers' venv: .venv-<python> (None: ours)
    retries: bool = True  # False: a failed send is never tried again, by design
    shortcut: bool = False  # loses mail by design: runs with --modes shortcuts only
    by_default: bool = True  # False: runs only when named (a local stand-in's figures)

    def __post_init__(self) -> None:
        queued = self.kind is Kind.QUEUED
        if queued != (self.worker is not None) or queued != bool(self.service or self.queue_file):
            raise ValueError(f"mode {self.name}: a queued mode has a queue and workers, no other")
        if not queued and self.lease_parameter is not None:
            raise ValueError(f"mode {self.name}: only a queued mode has a lease to shorten")
        if self.kind is Kind.BACKGROUND and self.blocks_event_loop:
            raise ValueError(f"mode {self.name}: a background mode answers before it sends")
        if (self.framework is None) != (self.config is None) or (
            self.config is not None and self.config not in FRAMEWORK_CONFIGS
        ):
            raise ValueError(
                f"mode {self.name}: a framework mode names its framework and one of the "
                f"configurations {', '.join(FRAMEWORK_CONFIGS)}"
            )

    @property
    def queued(self) -> bool:
        return self.kind is Kind.QUEUED

    @property
    def sends_after_reply(self) -> bool:
        """The 2xx comes before the API call (a queue's worker or a background task sends):
        ``send`` is then judged, like a queue's, against the form page."""
        return self.kind is not Kind.IN_REQUEST

    @property
    def has_broker_process(self) -> bool:
        """False where the queue is a file that the servers write (a crash of the broker
        is then a crash of those servers)."""
        return self.service is not None


_QUEUED = "servers.senders.queued:QueuedSender"
FRAMEWORKS_GROUP = "frameworks"  # --modes frameworks: every framework mode
SHORTCUTS_GROUP = "shortcuts"  # --modes shortcuts: background and naive
FRAMEWORK_CONFIGS = ("default", "reliable")


def _framework_modes(
    name: str,
    framework: str,
    sender: str,
    *,
    title: str,
    explanation: str,
    colour: str,
    service: str | None = None,
    queue_file: str | None = None,
    lease_parameter: str | None = None,
    python: str | None = None,
) -> tuple[Mode, ...]:
    """A framework's two modes: ``<name>`` (as the framework ships, dash-dotted in charts)
    and ``<name>-reliable`` (as its docs recommend, solid), one colour."""
    return tuple(
        Mode(
            name if config == "default" else f"{name}-{config}",
            Kind.QUEUED,
            sender,
            title=f"{title} ({config} configuration)",
            explanation=f"{explanation} Configuration: {config}.",
            colour=colour,
            linestyle="-" if config == "reliable" else "-.",
            service=service,
            queue_file=queue_file,
            worker=f"{framework}-worker",
            worker_args=("--config", config),
            lease_parameter=lease_parameter,
            framework=framework,
            config=config,
            depth=f"servers.frameworks.{framework}:open_depth",
            python=python,
        )
        for config in FRAMEWORK_CONFIGS
    )


MODES: dict[str, Mode] = {
    mode.name: mode
    for mode in (
        Mode(
            "direct",
            Kind.IN_REQUEST,
            "servers.senders.direct:DirectSender",
            title="the async client in the request",
            explanation="POST /send awaits the Mailgun API call (async HTTP client).",
            colour="#E69F00",
            linestyle="--",
        ),
        Mode(
            "blocking",
            Kind.IN_REQUEST,
            "servers.senders.blocking:BlockingSender",
            title="a blocking client in the request",
            explanation="POST /send calls the API with a blocking client inside the async handler.",
            colour="#D55E00",
            linestyle=":",
            blocks_event_loop=True,
        ),
        Mode(
            "rabbitmq",
            Kind.QUEUED,
            _QUEUED,
            title="RabbitMQ",
            explanation="POST /send publishes a persistent message and waits for the "
            "publisher confirm.",
            colour="#CC79A7",
            service="rabbitmq",
            worker="worker",
        ),
        Mode(
            "redis",
            Kind.QUEUED,
            _QUEUED,
            title="Redis",
            explanation="POST /send pushes the job to Redis (AOF on) and waits for the reply.",
            colour="#0072B2",
            service="redis",
            worker="worker",
            lease_parameter="visibility",
        ),
        Mode(
            "sqlite",
            Kind.QUEUED,
            _QUEUED,
            title="SQLite",
            explanation="POST /send commits a row to a jobs table in one SQLite file (WAL).",
            colour="#009E73",
            queue_file="sqlite:///{dir}/jobs.db",
            worker="worker",
            lease_parameter="lease",
        ),
        Mode(
            "postgres",
            Kind.QUEUED,
            _QUEUED,
            title="PostgreSQL",
            explanation="POST /send commits a row; workers claim with FOR UPDATE SKIP LOCKED.",
            colour="#56B4E9",
            service="postgres",
            worker="worker",
            lease_parameter="lease",
        ),
        Mode(
            "sqs",
            Kind.QUEUED,
            _QUEUED,
            title="Amazon SQS",
            explanation="POST /send sends the job to an SQS queue (aiobotocore) and waits for "
            "the reply; workers long-poll. Locally moto's in-memory SQS server: its figures "
            "are moto's, not AWS's.",
            colour="#999999",
            service="sqs",
            worker="worker",
            lease_parameter="visibility",
            by_default=False,  # moto's figures, not AWS's: not in the default comparison
        ),
        # Shortcuts people ship: as fast as a queue until something goes wrong.
        Mode(
            "background",
            Kind.BACKGROUND,
            "servers.senders.background:BackgroundSender",
            title="an in-process background task",
            explanation="POST /send starts a task in the server process that sends (with "
            "the workers' client and retries) and answers at once; no broker, no worker.",
            colour="#F0E442",
            shortcut=True,
        ),
        Mode(
            "naive",
            Kind.QUEUED,
            "servers.senders.naive:NaiveSender",
            title="the naive RabbitMQ queue",
            explanation="POST /send opens a new AMQP connection and publishes without "
            "confirms; one consumer polls with auto-ack every 5 s when idle, never retries "
            "and never checks the API's answer.",
            colour="#000000",
            service="rabbitmq",
            worker="naive-worker",
            depth="servers.naive:open_depth",
            retries=False,
            shortcut=True,
        ),
        # Task-queue frameworks on the same server: only the queue changes. Colours from
        # Paul Tol's colour-blind-safe "muted" scheme, the Okabe-Ito one being used up.
        *_framework_modes(
            "celery-redis",
            "celery",
            "servers.senders.celery:CelerySender",
            title="Celery on Redis",
            explanation="POST /send enqueues a Celery task on Redis (apply_async in a "
            "thread); a celery worker (threads pool) sends it.",
            colour="#CC6677",
            service="redis",
            lease_parameter="visibility",
        ),
        *_framework_modes(
            "celery-rabbitmq",
            "celery",
            "servers.senders.celery:CelerySender",
            title="Celery on RabbitMQ",
            explanation="POST /send publishes a Celery task to RabbitMQ and waits for the "
            "publisher confirm (apply_async in a thread); a celery worker (threads pool) "
            "sends it.",
            colour="#882255",
            service="rabbitmq",
        ),
        *_framework_modes(
            "rq",
            "rq",
            "servers.senders.rq:RQSender",
            title="RQ",
            explanation="POST /send enqueues an RQ job on Redis (Queue.enqueue in a "
            "thread); an RQ worker pool sends it, a forked work-horse per job.",
            colour="#117733",
            service="redis",
            lease_parameter="maintenance",
        ),
        *_framework_modes(
            "dramatiq-rabbitmq",
            "dramatiq",
            "servers.senders.dramatiq:DramatiqSender",
            title="Dramatiq on RabbitMQ",
            explanation="POST /send sends a Dramatiq message to RabbitMQ and waits for the "
            "publisher confirm (in a thread); a dramatiq worker (threads) runs the actor.",
            colour="#332288",
            service="rabbitmq",
        ),
        *_framework_modes(
            "dramatiq-redis",
            "dramatiq",
            "servers.senders.dramatiq:DramatiqSender",
            title="Dramatiq on Redis",
            explanation="POST /send sends a Dramatiq message to Redis (in a thread); a "
            "dramatiq worker (threads) runs the actor.",
            colour="#44AA99",
            service="redis",
            lease_parameter="heartbeat",
        ),
        *_framework_modes(
            "huey-sqlite",
            "huey",
            "servers.senders.huey:HueySender",
            title="Huey on SQLite",
            explanation="POST /send enqueues a huey task in a SQLite file (SqliteHuey, "
            "enqueue in a thread); huey's consumer (thread workers) sends it.",
            colour="#999933",
            queue_file="sqlite:///{dir}/huey.db",
        ),
        *_framework_modes(
            "procrastinate",
            "procrastinate",
            "servers.senders.procrastinate:ProcrastinateSender",
            title="Procrastinate",
            explanation="POST /send defers a Procrastinate job on PostgreSQL (defer_async, "
            "on the event loop); Procrastinate's asyncio worker sends it.",
            colour="#DDCC77",
            service="postgres",
            lease_parameter="stalled",
        ),
        *_framework_modes(
            "arq",
            "arq",
            "servers.senders.arq:ArqSender",
            title="arq",
            explanation="POST /send awaits arq's async enqueue_job on Redis (no thread); "
            "arq's worker runs the task coroutine, up to max_jobs at once on one loop.",
            colour="#AA4499",
            service="redis",
            python="arq",  # arq 0.28 pins redis-py < 6: a venv of its own
        ),
    )
}

IN_REQUEST = tuple(name for name, mode in MODES.items() if mode.kind is Kind.IN_REQUEST)
FRAMEWORKS = tuple(name for name, mode in MODES.items() if mode.framework is not None)
SHORTCUTS = tuple(name for name, mode in MODES.items() if mode.shortcut)
GROUPS = {FRAMEWORKS_GROUP: FRAMEWORKS, SHORTCUTS_GROUP: SHORTCUTS}
# The reference queues: what runs by default, and what chaos breaks by default.
QUEUED = tuple(
    name
    for name, mode in MODES.items()
    if mode.queued and mode.by_default and name not in FRAMEWORKS and name not in SHORTCUTS
)
DEFAULT = tuple(
    name
    for name, mode in MODES.items()
    if mode.by_default and name not in FRAMEWORKS and name not in SHORTCUTS
)


def mode(name: str) -> Mode:
    """The mode called ``name``, or a one-sentence error that lists the known ones."""
    try:
        return MODES[name]
    except KeyError:
        raise ConfigError(f"unknown mode {name!r}; choose one of {', '.join(MODES)}") from None


def parse_modes(text: str) -> tuple[str, ...]:
    """``direct,redis`` → the modes named, in order; a group (``frameworks``: every
    framework mode, ``shortcuts``: background and naive) stands for its modes; unknown
    names are one error."""
    names: list[str] = []
    for name in (m.strip() for m in text.split(",")):
        for each in GROUPS.get(name, (name,) if name else ()):
            if each not in names:
                names.append(each)
    unknown = [m for m in names if m not in MODES]
    if unknown or not names:
        groups = "; ".join(f"{group} for {', '.join(members)}" for group, members in GROUPS.items())
        raise ConfigError(
            f"unknown mode(s) {', '.join(unknown) or '(none)'}; choose from "
            f"{', '.join(MODES)}, or a group: {groups}"
        )
    return tuple(names)
