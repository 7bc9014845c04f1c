"""``huey-sqlite``: the handler enqueues a huey task (:mod:`servers.frameworks.huey`), in
a thread."""

from __future__ import annotations

from queues.base import Job
from queues.errors import ConfigError
from servers.frameworks.huey import enqueue, make_huey
from servers.senders.base import SenderContext
from servers.senders.threaded import ThreadedSender


class HueySender(ThreadedSender):
    def __init__(self, context: SenderContext) -> None:
        super().__init__(context.recorder)
        if not context.queue_url:
            raise ConfigError("the huey mode needs its SQLite file's URL (--queue-url)")
        config = context.framework_config or "default"
        self.huey, self.send_email = make_huey(context.queue_url, context.queue_name, config)

    @classmethod
    async def open(cls, context: SenderContext) -> HueySender:
        return cls(context)

    def enqueue(self, job: Job) -> None:
        enqueue(self.send_email, job)

    def close(self) -> None:
        self.huey.storage.close()
