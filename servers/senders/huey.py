"""``huey-sqlite``: the handler enqueues a huey task (:mod:`servers.frameworks.huey`), in
a thread."""

from __future__ import annotations

from queues.base import Job
from servers.frameworks.huey import enqueue, make_huey
from servers.senders.base import SenderContext
from servers.senders.threaded import ThreadedSender


class HueySender(ThreadedSender):
    def __init__(self, context: SenderContext) -> None:
        super().__init__(context.recorder)
        # No URL is a ConfigError from make_huey: "a SQLite URL names a file".
        self.huey, self.send_email = make_huey(
            context.queue_url or "", context.queue_name, context.framework_config or "default"
        )

    @classmethod
    async def open(cls, context: SenderContext) -> HueySender:
        return cls(context)

    def enqueue(self, job: Job) -> None:
        enqueue(self.send_email, job)

    def close(self) -> None:
        self.huey.storage.close()
