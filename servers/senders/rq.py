"""``rq``: the handler enqueues an RQ job (:mod:`servers.frameworks.rq`), in a thread."""

from __future__ import annotations

from redis import Redis
from rq import Queue

from queues.base import Job
from queues.errors import ConfigError
from servers.frameworks.rq import enqueue, redis_url
from servers.senders.base import SenderContext
from servers.senders.threaded import ENQUEUE_THREADS, ThreadedSender


class RQSender(ThreadedSender):
    def __init__(self, context: SenderContext) -> None:
        super().__init__(context.recorder)
        if not context.queue_url:
            raise ConfigError("the RQ mode needs a Redis URL (--queue-url)")
        # One connection per enqueueing thread, so that none waits for another's.
        self.redis = Redis.from_url(
            redis_url(context.queue_url)[0], max_connections=ENQUEUE_THREADS
        )
        self.rq_queue = Queue(context.queue_name, connection=self.redis)

    @classmethod
    async def open(cls, context: SenderContext) -> RQSender:
        return cls(context)

    def enqueue(self, job: Job) -> None:
        enqueue(self.rq_queue, job)

    def close(self) -> None:
        self.redis.close()
