"""Queue depth, sampled once a second by the harness over a connection of its own.

Not through the server under test: a sample would then cost that server a request (and,
for RabbitMQ, a channel and 38 queue declares) every second while it is being measured.
What a sample counts is the backend's :meth:`queues.base.Queue.depth` (jobs waiting,
retries waiting out their delay, and jobs claimed by a worker but not yet settled), with
one exception: RabbitMQ does not report other consumers' unacknowledged messages over
AMQP, so for a broker mailbench started the harness asks the broker itself, through
``erl_call`` on the node's private Erlang distribution port (a few ms of CPU;
``rabbitmqctl`` would start an Erlang VM, most of a second of CPU, every second), for
the messages of the queue and its wait queues (a Dramatiq queue's delay queue too), ready
or unacknowledged (of a quorum queue, from its Raft state: its ``messages_ready`` lags by
seconds). A
RabbitMQ someone else runs (``AMQP_URL``) is sampled over AMQP instead, which counts
ready messages and waiting retries only.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import re
import shutil
import threading
import time
from types import TracebackType
from typing import Protocol
from urllib.parse import unquote, urlsplit

from harness.services.brokers import RabbitMQ
from harness.services.settings import ServiceSettings
from queues import open_queue
from queues.errors import MailbenchError
from servers.modes import Mode

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9._-]+")  # safe inside an Erlang binary literal
_SUM = re.compile(rb"\{ok,\s*(\d+)\}")


class Probe(Protocol):
    async def depth(self) -> int: ...
    async def close(self) -> None: ...


class RabbitMQDepth:
    """Ready and unacknowledged messages of a queue and its wait queues, as the broker
    mailbench started counts them (``erl_call``, authenticated by the node's cookie in
    its home directory)."""

    def __init__(self, settings: ServiceSettings, queue_name: str, vhost: str) -> None:
        self.env = {
            "HOME": str(settings.base_dir / RabbitMQ.name),  # .erlang.cookie
            "ERL_EPMD_PORT": str(settings.epmd_port),
            "PATH": settings.env.get("PATH") or "/usr/bin:/bin",
        }
        retry = f"{queue_name}.retry."
        delay = f"{queue_name}.DQ"  # a Dramatiq queue's delay queue, where retries wait
        # A quorum queue's info (messages_ready, ...) is refreshed only every few seconds;
        # its Raft state machine, asked directly, counts ready, unacknowledged and
        # dead-lettered messages not yet confirmed by their target.
        self.expression = (
            f'Q = <<"{queue_name}">>, D = <<"{delay}">>, P = <<"{retry}">>, N = byte_size(P), '
            "lists:sum([case amqqueue:get_type(Q1) of "
            "rabbit_quorum_queue -> {RaName, _} = amqqueue:get_pid(Q1), "
            "{ok, {_, C}, _} = ra:local_query({RaName, node()}, "
            "fun rabbit_fifo:query_messages_total/1), C; "
            "_ -> [{_, R}, {_, U}] = rabbit_amqqueue:info(Q1, "
            "[messages_ready, messages_unacknowledged]), R + U end "
            f'|| Q1 <- rabbit_amqqueue:list(<<"{vhost}">>), '
            "{resource, _, queue, Name} <- [amqqueue:get_name(Q1)], "
            "Name =:= Q orelse Name =:= D orelse "
            "(byte_size(Name) > N andalso binary:part(Name, 0, N) =:= P)]).\n"
        ).encode()

    @classmethod
    def of(
        cls, url: str, queue_name: str, settings: ServiceSettings | None
    ) -> RabbitMQDepth | None:
        """A probe for the broker at ``url`` if mailbench runs it with ``settings``."""
        if settings is None or shutil.which("erl_call") is None:
            return None
        parts = urlsplit(url)
        ours = parts.hostname in ("127.0.0.1", "localhost") and parts.port == settings.rabbitmq_port
        cookie = settings.base_dir / RabbitMQ.name / ".erlang.cookie"
        vhost = unquote(parts.path[1:]) or "/"
        names_fit = _NAME.fullmatch(queue_name) and (vhost == "/" or _NAME.fullmatch(vhost))
        if not ours or not cookie.is_file() or not names_fit:
            return None
        return cls(settings, queue_name, vhost)

    async def depth(self) -> int:
        process = await asyncio.create_subprocess_exec(
            "erl_call", "-n", RabbitMQ.node, "-e",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=self.env,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(self.expression), timeout=5)
        found = _SUM.search(out)
        if process.returncode != 0 or found is None:
            raise MailbenchError(f"erl_call could not count the queue: {(out + err)[:200]!r}")
        return int(found.group(1))

    async def close(self) -> None:
        pass


async def open_probe(
    url: str, queue_name: str, settings: ServiceSettings | None, mode: Mode | None = None
) -> Probe:
    """The harness's own way to count ``queue_name``'s jobs at ``url``: the broker's
    count where mailbench runs RabbitMQ, else the mode's probe (a framework's queue,
    which mailbench's backends do not read), else the queue backend's."""
    if urlsplit(url).scheme.startswith("amqp"):
        probe = RabbitMQDepth.of(url, queue_name, settings)
        if probe is not None:
            return probe
    if mode is not None and mode.depth is not None:
        module_name, _, function = mode.depth.partition(":")
        opened: Probe = await getattr(importlib.import_module(module_name), function)(
            url, queue_name
        )
        return opened
    return await open_queue(url, queue_name)


class DepthSampler:
    """Samples a queue's depth once a second in a thread of its own while in a ``with``
    block; :attr:`samples` maps the wall-clock time of each sample (``"%.3f"``) to the
    depth, None where it could not be had (a broker restarting)."""

    def __init__(
        self,
        url: str,
        queue_name: str,
        settings: ServiceSettings | None,
        mode: Mode | None = None,
    ) -> None:
        self.url = url
        self.queue_name = queue_name
        self.settings = settings
        self.mode = mode
        self.samples: dict[str, int | None] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mailbench-depth", daemon=True)

    def __enter__(self) -> DepthSampler:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        asyncio.run(self._sample())

    async def _sample(self) -> None:
        try:
            probe = await open_probe(self.url, self.queue_name, self.settings, self.mode)
        except MailbenchError as exc:
            log.warning("queue depth will not be sampled: %s", exc)
            return
        try:
            next_at = time.monotonic()
            while not self._stop.is_set():
                asked = time.time()
                try:
                    depth: int | None = await probe.depth()
                except (MailbenchError, OSError, TimeoutError) as exc:
                    log.debug("no depth sample: %s", exc)
                    depth = None
                self.samples[f"{asked:.3f}"] = depth
                next_at += 1.0
                while not self._stop.is_set() and time.monotonic() < next_at:
                    await asyncio.sleep(min(0.1, max(0.0, next_at - time.monotonic())))
        finally:
            await probe.close()
