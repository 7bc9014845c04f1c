"""``procrastinate``: the handler defers a Procrastinate job
(:mod:`servers.frameworks.procrastinate`) with its native async API, on the event loop."""

from __future__ import annotations

from procrastinate import App

from queues import Queue
from queues.base import Job
from queues.errors import ConfigError
from servers.frameworks.procrastinate import POOL_SIZE, defer, ensure_schema, make_app
from servers.metrics import Recorder
from servers.render import Renderer
from servers.senders.base import Handed, SenderContext, enqueued


class ProcrastinateSender:
    queue: Queue | None = None  # the harness counts Procrastinate's jobs itself
    renderer: Renderer | None = None  # the worker renders, never the request

    def __init__(self, app: App, queue_name: str, recorder: Recorder) -> None:
        self.app = app
        self.queue_name = queue_name
        self.recorder = recorder

    @classmethod
    async def open(cls, context: SenderContext) -> ProcrastinateSender:
        if not context.queue_url:
            raise ConfigError("the Procrastinate mode needs a PostgreSQL URL (--queue-url)")
        # Before the server answers: no request defers into a database without the schema.
        await ensure_schema(context.queue_url)
        app = make_app(context.queue_url, min_size=1, max_size=POOL_SIZE)
        await app.open_async()
        return cls(app, context.queue_name, context.recorder)

    async def hand(self, job: Job) -> Handed:
        # A connector or psycopg error, a pool timeout: the job is not accepted.
        return await enqueued(self.recorder, defer(self.app, self.queue_name, job), (Exception,))

    async def aclose(self) -> None:
        await self.app.close_async()
