"""The queued modes: the handler enqueues a job and answers once the broker took it.

The backend is the one the queue URL's scheme names (:func:`queues.open_queue`), so one
sender serves RabbitMQ, Redis, SQLite and PostgreSQL alike; each backend's promise (a
publisher confirm, a command reply, a commit) is kept before :meth:`enqueue` returns.
"""

from __future__ import annotations

from queues import Queue, open_queue
from queues.base import Job
from queues.errors import ConfigError, MailbenchError
from servers.metrics import Recorder
from servers.render import Renderer
from servers.senders.base import Handed, SenderContext, enqueued


class QueuedSender:
    renderer: Renderer | None = None  # workers render, never the request

    def __init__(self, queue: Queue, recorder: Recorder) -> None:
        self.queue: Queue | None = queue
        self._queue = queue
        self.recorder = recorder

    @classmethod
    async def open(cls, context: SenderContext) -> QueuedSender:
        if not context.queue_url:
            raise ConfigError("a queued mode needs a queue URL (--queue-url)")
        return cls(await open_queue(context.queue_url, context.queue_name), context.recorder)

    async def hand(self, job: Job) -> Handed:
        return await enqueued(self.recorder, self._queue.enqueue(job), MailbenchError)

    async def aclose(self) -> None:
        await self._queue.close()
