"""The orchestrator's errors, on top of the tree every layer shares (:mod:`queues.errors`).

Harness code imports every error from here; the shared ones are the same classes as in
:mod:`queues.errors`, so ``except MailbenchError`` at the entry point catches them all.
"""

from __future__ import annotations

from queues.errors import (
    ConfigError,
    InvalidJob,
    MailbenchError,
    QueueError,
    ServiceUnavailable,
    UnknownBackend,
)

__all__ = [
    "ConfigError",
    "InvalidJob",
    "MailbenchError",
    "ProcessFailed",
    "QueueError",
    "ResultsError",
    "ServiceUnavailable",
    "UnknownBackend",
]


class ProcessFailed(MailbenchError):
    """A child process (server, worker, fake Mailgun, Locust) exited or never became ready."""


class ResultsError(MailbenchError):
    """A results folder is missing files or has files that do not parse."""
