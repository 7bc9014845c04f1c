"""``blocking``: the handler calls the API with a blocking client, on the event loop."""

from __future__ import annotations

import time

from queues import Queue
from queues.base import Job
from servers.mailgun import BlockingMailgunClient
from servers.metrics import Recorder
from servers.render import Renderer
from servers.senders.base import Handed, SenderContext, api_result, render_inline, start_renderer


class BlockingSender:
    queue: Queue | None = None

    def __init__(self, context: SenderContext) -> None:
        self.client = BlockingMailgunClient(context.mailgun)
        self.recorder: Recorder = context.recorder
        self.renderer: Renderer | None = start_renderer(context)

    @classmethod
    async def open(cls, context: SenderContext) -> BlockingSender:
        return cls(context)

    async def hand(self, job: Job) -> Handed:
        inline = render_inline(self.renderer, self.recorder, job.email)
        started = time.perf_counter()
        # Deliberately synchronous: the event loop stops for the whole API call.
        result = self.client.send(job.email, job.id, inline=inline)
        self.recorder.record(result.metric, time.perf_counter() - started)
        return api_result(result.ok, result.outcome, result.detail)

    async def aclose(self) -> None:
        self.client.close()
