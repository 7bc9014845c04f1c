"""``naive``: per request, a new AMQP connection, a publish without confirms, a 200.

The Dream example's ``queue_email`` (see :mod:`servers.naive`): connect, open a channel
without publisher confirms, declare the queue, publish a transient message. The reply
waits for the connection's handshakes (several round trips and a TCP connect) but for
no word from the broker about the message: a publish is written to the socket and
taken for done. Only a failure to connect is an error (a 5xx, as Dream answers an
exception).
"""

from __future__ import annotations

import aio_pika

from queues import Queue
from queues.base import Job, encode_job
from queues.errors import ConfigError
from servers.metrics import Recorder
from servers.naive import declare
from servers.render import Renderer
from servers.senders.base import Handed, SenderContext, enqueued


class NaiveSender:
    queue: Queue | None = None  # the harness counts the RabbitMQ queue itself
    renderer: Renderer | None = None  # the worker would render, never the request

    def __init__(self, url: str, queue_name: str, recorder: Recorder) -> None:
        self.url = url
        self.queue_name = queue_name
        self.recorder = recorder

    @classmethod
    async def open(cls, context: SenderContext) -> NaiveSender:
        if not context.queue_url or not context.queue_url.startswith("amqp"):
            raise ConfigError("the naive mode needs a RabbitMQ URL (--queue-url amqp://...)")
        return cls(context.queue_url, context.queue_name, context.recorder)

    async def hand(self, job: Job) -> Handed:
        # A refused connection, a closed channel: the visitor sees a 503.
        return await enqueued(self.recorder, self._publish(job), Exception)

    async def _publish(self, job: Job) -> None:
        connection = await aio_pika.connect(self.url)
        try:
            channel = await connection.channel(publisher_confirms=False)
            await declare(channel, self.queue_name)
            await channel.default_exchange.publish(
                aio_pika.Message(encode_job(job)), routing_key=self.queue_name
            )
        finally:
            await connection.close()  # the original leaves it open

    async def aclose(self) -> None:
        pass
