"""The framework modes' common sender: a blocking enqueue, off the event loop.

Celery's ``apply_async`` and RQ's ``Queue.enqueue`` have no async API, so the handler
runs them in a thread pool of its own (``loop.run_in_executor``), as their docs suggest
for async code; the ``enqueue`` histogram holds what that costs, the hop to the thread
and back included. The 2xx is given once the call returns: the framework's broker has
accepted the job (see :mod:`servers.frameworks`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from queues import Queue
from queues.base import Job
from servers.metrics import Recorder
from servers.render import Renderer
from servers.senders.base import QUEUE_UNAVAILABLE, Handed, queued_result

log = logging.getLogger(__name__)

ENQUEUE_THREADS = 10  # Celery's broker_pool_limit: more threads would wait for a connection


class ThreadedSender:
    """Subclasses say how to enqueue one job, blocking (:meth:`enqueue`), and how to let
    go of the client (:meth:`close`)."""

    queue: Queue | None = None  # the harness counts the framework's queue itself
    renderer: Renderer | None = None  # the framework's worker renders, never the request

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self._threads = ThreadPoolExecutor(ENQUEUE_THREADS, thread_name_prefix="enqueue")

    def enqueue(self, job: Job) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Let go of the framework's connections (in a thread)."""

    async def hand(self, job: Job) -> Handed:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._threads, self.enqueue, job)
        except Exception as exc:
            # Whatever the framework raised (a kombu, redis-py or socket error), the job
            # is not accepted: the visitor is told to try again.
            log.warning("enqueue failed: %r", exc)
            return QUEUE_UNAVAILABLE
        return queued_result(self.recorder, started)

    async def aclose(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._threads, self.close)
        self._threads.shutdown(wait=True)
