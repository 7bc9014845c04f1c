"""``celery-redis``, ``celery-rabbitmq``: the handler enqueues a Celery task
(:mod:`servers.frameworks.celery`), in a thread."""

from __future__ import annotations

import asyncio

from queues.base import Job
from queues.errors import ConfigError
from servers.frameworks.celery import make_app, publish
from servers.senders.base import SenderContext
from servers.senders.threaded import ThreadedSender


class CelerySender(ThreadedSender):
    def __init__(self, context: SenderContext) -> None:
        super().__init__(context.recorder)
        if not context.queue_url:
            raise ConfigError("a Celery mode needs a broker URL (--queue-url)")
        config = context.framework_config or "default"
        self.app = make_app(context.queue_url, context.queue_name, config)

    @classmethod
    async def open(cls, context: SenderContext) -> CelerySender:
        sender = cls(context)
        # Connected before the first request, so that it does not pay for it.
        await asyncio.get_running_loop().run_in_executor(sender._threads, sender._connect)
        return sender

    def _connect(self) -> None:
        with self.app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=3)

    def enqueue(self, job: Job) -> None:
        publish(self.app, job)

    def close(self) -> None:
        self.app.close()
