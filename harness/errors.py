"""Every error mailbench raises on purpose.

Driver errors (aiohttp, httpx, aio-pika, redis, asyncpg, sqlite3) are translated into
these at the boundary with ``raise ... from exc``, so a user reads one sentence that
names what failed and what to do, not a traceback from three libraries deep.
"""

from __future__ import annotations


class MailbenchError(Exception):
    """Base class: the message is a complete sentence meant for the user."""


class ConfigError(MailbenchError):
    """A command-line option, environment variable or spec cannot be understood."""


class LatencySpecError(ConfigError):
    """A latency model spec such as ``uniform:0.5,1.0`` is malformed."""


class ServiceUnavailable(MailbenchError):
    """A broker (RabbitMQ, Redis, PostgreSQL) cannot be had on this machine."""


class ProcessFailed(MailbenchError):
    """A child process (server, worker, fake Mailgun, Locust) exited or never became ready."""


class QueueError(MailbenchError):
    """A queue backend failed to enqueue, consume or acknowledge."""


class UnknownBackend(QueueError, ConfigError):
    """A queue URL has a scheme no backend is registered for."""


class InvalidJob(QueueError):
    """A message on a queue cannot be decoded into a job (it goes to the dead letter)."""


class ResultsError(MailbenchError):
    """A results folder is missing files or has files that do not parse."""
