"""The errors mailbench raises on purpose, from the bottom layer up.

The tree starts here, in the layer everything else builds on (the job contract), so that
queue backends, the system under test in ``servers`` and the orchestrator in ``harness``
all raise and catch the same classes without importing upwards. ``harness.errors`` adds
the orchestrator's own (a child process that failed, a results folder that does not
parse); ``servers.fakegun.latency`` adds the latency spec's.

Driver errors (aiohttp, httpx, aio-pika, redis, asyncpg, sqlite3) are translated into
these at the boundary with ``raise ... from exc``, one place per driver, so a user reads
one sentence that names what failed and what to do, not a traceback from three
libraries deep.
"""

from __future__ import annotations


class MailbenchError(Exception):
    """Base class: the message is a complete sentence meant for the user."""


class ConfigError(MailbenchError):
    """A command-line option, environment variable, URL or spec cannot be understood."""


class ServiceUnavailable(MailbenchError):
    """A broker (RabbitMQ, Redis, PostgreSQL) cannot be had on this machine."""


class QueueError(MailbenchError):
    """A queue backend failed to enqueue, consume or acknowledge."""


class UnknownBackend(QueueError, ConfigError):
    """A queue URL has a scheme no backend is registered for."""


class InvalidJob(QueueError):
    """A message on a queue cannot be decoded into a job (it goes to the dead letter)."""
