"""``direct``: the handler awaits the Mailgun API call with the async client."""

from __future__ import annotations

import time

from queues import Queue
from queues.base import Job
from servers.mailgun import MailgunClient
from servers.metrics import Recorder
from servers.render import Renderer
from servers.senders.base import Handed, SenderContext, api_result, render_inline, start_renderer


class DirectSender:
    queue: Queue | None = None

    def __init__(self, context: SenderContext) -> None:
        self.client = MailgunClient(context.mailgun)
        self.recorder: Recorder = context.recorder
        self.renderer: Renderer | None = start_renderer(context)

    @classmethod
    async def open(cls, context: SenderContext) -> DirectSender:
        return cls(context)

    async def hand(self, job: Job) -> Handed:
        inline = render_inline(self.renderer, self.recorder, job.email)
        started = time.perf_counter()
        result = await self.client.send(job.email, job.id, inline=inline)
        self.recorder.record(result.metric, time.perf_counter() - started)
        return api_result(result.ok, result.outcome, result.detail)

    async def aclose(self) -> None:
        await self.client.aclose()
