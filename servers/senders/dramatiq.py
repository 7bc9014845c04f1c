"""``dramatiq-rabbitmq``, ``dramatiq-redis``: the handler sends a Dramatiq message
(:mod:`servers.frameworks.dramatiq`), in a thread."""

from __future__ import annotations

import asyncio
from typing import Any

from dramatiq.brokers.rabbitmq import RabbitmqBroker

from queues.base import Job
from queues.errors import ConfigError
from servers.frameworks.dramatiq import make_broker, publish, sender_actor
from servers.senders.base import SenderContext
from servers.senders.threaded import ThreadedSender


class DramatiqSender(ThreadedSender):
    def __init__(self, context: SenderContext) -> None:
        super().__init__(context.recorder)
        if not context.queue_url:
            raise ConfigError("a Dramatiq mode needs a broker URL (--queue-url)")
        self.broker = make_broker(context.queue_url, context.framework_config or "default")
        self.actor: Any = sender_actor(self.broker, context.queue_name)
        self.queue_name = context.queue_name

    @classmethod
    async def open(cls, context: SenderContext) -> DramatiqSender:
        sender = cls(context)
        # The queues declared before the first request, so that it does not pay for it.
        await asyncio.get_running_loop().run_in_executor(sender._threads, sender._declare)
        return sender

    def _declare(self) -> None:
        if isinstance(self.broker, RabbitmqBroker):
            self.broker.declare_queue(self.queue_name, ensure=True)

    def enqueue(self, job: Job) -> None:
        publish(self.actor, job)

    def close(self) -> None:
        self.broker.close()
