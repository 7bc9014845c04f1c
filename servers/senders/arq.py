"""``arq``: the handler awaits arq's own async enqueue (:mod:`servers.frameworks.arq`) on
the event loop: no thread, unlike Celery and RQ."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from queues import Queue
from queues.base import Job
from queues.errors import ConfigError
from servers.frameworks.arq import enqueue, open_pool
from servers.metrics import Recorder
from servers.render import Renderer
from servers.senders.base import Handed, SenderContext, enqueued

if TYPE_CHECKING:
    from arq.connections import ArqRedis


@dataclass
class ArqSender:
    pool: ArqRedis  # arq's connection pool, which enqueues
    recorder: Recorder
    queue: ClassVar[Queue | None] = None  # the harness counts arq's queue itself
    renderer: ClassVar[Renderer | None] = None  # arq's worker renders, never the request

    @classmethod
    async def open(cls, context: SenderContext) -> ArqSender:
        if not context.queue_url:
            raise ConfigError("the arq mode needs a Redis URL (--queue-url)")
        # Connected here, before the first request, so that it does not pay for it.
        return cls(await open_pool(context.queue_url, context.queue_name), context.recorder)

    async def hand(self, job: Job) -> Handed:
        # Whatever redis-py raised, the job is not accepted: try again, says the reply.
        return await enqueued(self.recorder, enqueue(self.pool, job), Exception)

    async def aclose(self) -> None:
        await self.pool.aclose()
