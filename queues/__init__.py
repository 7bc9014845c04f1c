"""Queue backends behind one contract (see :mod:`queues.base`), chosen by URL scheme."""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from queues.base import Delivery, Email, Job, Queue, decode_job, encode_job
from queues.errors import UnknownBackend
from queues.urls import redact_url

__all__ = [
    "BACKENDS",
    "Delivery",
    "Email",
    "Job",
    "Queue",
    "decode_job",
    "encode_job",
    "open_queue",
]

# scheme -> "module:factory"; imported only when used, so a missing driver for one broker
# never stops the others from working.
BACKENDS: dict[str, str] = {
    "memory": "queues.memory:open_memory",
    "amqp": "queues.rabbitmq:open_rabbitmq",
    "amqps": "queues.rabbitmq:open_rabbitmq",
    "redis": "queues.redis:open_redis",
    "rediss": "queues.redis:open_redis",
    "sqlite": "queues.sqlite:open_sqlite",
    "postgresql": "queues.postgres:open_postgres",
    "postgres": "queues.postgres:open_postgres",
    "sqs": "queues.sqs:open_sqs",
    "https": "queues.sqs:open_sqs",  # an AWS SQS queue URL (any other https:// is refused)
}


async def open_queue(url: str, name: str = "mailbench") -> Queue:
    """Connect to the queue at ``url`` (``amqp://``, ``redis://``, ``sqlite:///path``,
    ``postgresql://``, ``sqs://``, an SQS ``https://`` queue URL, ``memory://``) and make
    sure the queue ``name`` exists."""
    scheme = urlsplit(url).scheme
    target = BACKENDS.get(scheme)
    if target is None:
        known = ", ".join(f"{s}://" for s in sorted(BACKENDS))
        raise UnknownBackend(f"no queue backend for {redact_url(url)!r}; known schemes: {known}")
    module_name, factory_name = target.split(":")
    factory = getattr(importlib.import_module(module_name), factory_name)
    queue: Queue = await factory(url, name)
    return queue
