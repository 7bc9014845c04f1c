"""``arq``: the handler awaits arq's own async enqueue (:mod:`servers.frameworks.arq`) on
the event loop: no thread, unlike Celery and RQ."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from queues import Queue
from queues.base import Job
from queues.errors import ConfigError
from servers.frameworks.arq import enqueue, open_pool
from servers.metrics import Recorder
from servers.render import Renderer
from servers.senders.base import QUEUE_UNAVAILABLE, Handed, SenderContext, queued_result

if TYPE_CHECKING:
    from arq.connections import ArqRedis

log = logging.getLogger(__name__)


class ArqSender:
    queue: Queue | None = None  # the harness counts arq's queue itself
    renderer: Renderer | None = None  # arq's worker renders, never the request

    def __init__(self, pool: ArqRedis, recorder: Recorder) -> None:
        self.pool = pool
        self.recorder = recorder

    @classmethod
    async def open(cls, context: SenderContext) -> ArqSender:
        if not context.queue_url:
            raise ConfigError("the arq mode needs a Redis URL (--queue-url)")
        # Connected here, before the first request, so that it does not pay for it.
        return cls(await open_pool(context.queue_url, context.queue_name), context.recorder)

    async def hand(self, job: Job) -> Handed:
        started = time.perf_counter()
        try:
            await enqueue(self.pool, job)
        except Exception as exc:
            # Whatever redis-py raised, the job is not accepted: try again, says the reply.
            log.warning("enqueue failed: %r", exc)
            return QUEUE_UNAVAILABLE
        return queued_result(self.recorder, started)

    async def aclose(self) -> None:
        await self.pool.aclose()
