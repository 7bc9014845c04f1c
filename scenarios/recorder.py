"""A Locust plugin that records every request's time in microseconds.

Locust's own statistics round anything under 100 ms to whole milliseconds, so a 150 µs
form page reads as 0. This plugin takes each time from the ``request`` event into the
process's :class:`~scenarios.record.LoadRecord` (HdrHistograms per request name, per
second too), with the handler's own time when the server sends a ``Server-Timing``
header (``form_server``, ``send_server``).

It also keeps the client's side of the loss accounting: every ``send`` request whose
``context`` names a ``recipient`` (unique per visit, see :mod:`scenarios.users`) is
listed as acknowledged (a 2xx; with the time the send was posted) or failed, and every
send posted as started. The harness matches these against the fake Mailgun's ledger.

No report is lost, however the run stops. Every few seconds, and once more when its users
have stopped, each process cuts a chunk of what it recorded (:meth:`LoadRecord.chunk`)
and appends it to its own journal ``--hdr-out``/``locust-hdr-<pid>.jsonl``; a Locust
worker also ships the chunk to the master, which appends it to *its* journal (for
workers on other hosts, whose files the harness cannot read). Before quitting, the
master asks every worker to stop its users and waits for their final chunks (Locust
itself waits only 0.5 s for the last reports). A chunk carries a unique id, so one found
in two journals counts once; the harness merges every journal of a folder
(:func:`harness.results.collect.read_locust`). When the master (or the single process)
quits it writes ``locust-hdr.json``: when the run started and stopped.

Enable it by importing this module in a locustfile and passing ``--hdr-out DIR``;
``--warmup S`` leaves the requests sent in each process's first S seconds out of the
summary histograms (they stay in the per-second ones).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

import gevent
import psutil
from locust import events
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

from scenarios.record import LoadRecord, Visit, server_time_us

log = logging.getLogger(__name__)

OUTPUT_FILE = "locust-hdr.json"
JOURNAL = "locust-hdr-{pid}.jsonl"
FLUSH_S = 3.0  # how often a chunk is cut (Locust's own worker report interval)
FINAL_GRACE_S = 15.0  # beyond the stop timeout, how long the master waits for final chunks
_CHUNK = "mailbench_chunk"  # worker -> master: a chunk
_FLUSH = "mailbench_flush"  # master -> workers: stop your users and send your final chunk


class HdrRecorder:
    def __init__(self, environment: Environment) -> None:
        self.environment = environment
        options = environment.parsed_options
        out = getattr(options, "hdr_out", "") or ""
        self.out = Path(out) if out else None
        process = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.record = LoadRecord(process, float(getattr(options, "warmup", 0.0) or 0.0))
        environment.mailbench_counters = self.record.counters  # type: ignore[attr-defined]
        self.started_at = time.time()
        self.finals: set[str] = set()  # on the master: workers whose final chunk arrived
        self._greenlets: list[gevent.Greenlet] = []
        ev = environment.events
        ev.request.add_listener(self.on_request)
        ev.cpu_warning.add_listener(self.on_cpu_warning)
        ev.test_start.add_listener(self.on_test_start)
        ev.test_stopping.add_listener(self.on_test_stopping)
        ev.test_stop.add_listener(self.on_test_stop)
        ev.quitting.add_listener(self.on_quitting)
        runner = environment.runner
        if isinstance(runner, MasterRunner):
            runner.register_message(_CHUNK, self.on_chunk)
        elif isinstance(runner, WorkerRunner):
            runner.register_message(_FLUSH, self.on_flush, concurrent=True)

    @property
    def generates_load(self) -> bool:
        return not isinstance(self.environment.runner, MasterRunner)

    # -- measuring -----------------------------------------------------------------------
    def on_test_start(self, environment: Environment, **_: Any) -> None:
        # A worker on another host has the master's options only from now on.
        self.record.warmup_s = float(getattr(environment.parsed_options, "warmup", 0.0) or 0.0)
        if self.generates_load and not self._greenlets:
            self._greenlets = [gevent.spawn(self._sample_cpu), gevent.spawn(self._flush_often)]

    def _sample_cpu(self) -> None:
        # The generator's own CPU: a saturated generator reports its own queueing.
        process = psutil.Process()
        process.cpu_percent(None)
        while True:
            gevent.sleep(1.0)
            self.record.cpu_samples.append(process.cpu_percent(None))

    def on_request(
        self,
        name: str,
        response_time: float,
        exception: BaseException | None = None,
        context: dict[str, Any] | None = None,
        response: Any = None,
        **_: Any,
    ) -> None:
        now = time.perf_counter()
        answered_at = time.time()
        context = context or {}
        sent_at = answered_at - response_time / 1000.0  # Locust's perf_counter milliseconds
        recipient = context.get("recipient")
        if recipient is not None:
            if exception is None:
                # When the send was posted: delivery lag runs from the user's click.
                self.record.sends_ok.append((recipient, sent_at))
            else:
                self.record.sends_failed.append(recipient)
        intended = context.get("intended")
        visit = context.get("visit")
        if isinstance(visit, Visit):
            visit.answered(name, response_time / 1000.0)
        server = None
        if exception is None and response is not None:
            headers = getattr(response, "headers", None) or {}
            server = server_time_us(headers.get("Server-Timing"))
        self.record.record(
            name,
            response_time * 1000.0,
            sent_at,
            answered_at,
            failed=exception is not None,
            # Open model: also from the request's scheduled start (coordinated omission).
            intended_us=(now - intended) * 1_000_000 if intended is not None else None,
            server_us=server,
        )

    def on_cpu_warning(self, **_: Any) -> None:
        self.record.cpu_warnings += 1

    # -- chunks --------------------------------------------------------------------------
    def _flush_often(self) -> None:
        while True:
            gevent.sleep(FLUSH_S)
            self.flush()

    def flush(self, final: bool = False) -> None:
        """Cut a chunk: into this process's journal and, on a worker, to the master."""
        if self.record.empty() and not final:
            return
        chunk = self.record.chunk(final)
        self._journal(chunk)
        runner = self.environment.runner
        if isinstance(runner, WorkerRunner):
            try:
                runner.send_message(_CHUNK, chunk)
            except Exception:  # the master is gone: the journal still holds the chunk
                log.warning("could not ship chunk %s to the master", chunk["id"], exc_info=True)

    def _journal(self, chunk: dict[str, Any]) -> None:
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        line = json.dumps(chunk, separators=(",", ":")) + "\n"
        # One write per line: a process killed mid-write leaves one bad line, skipped.
        with (self.out / JOURNAL.format(pid=os.getpid())).open("a") as f:
            f.write(line)

    def on_chunk(self, environment: Environment, msg: Any, **_: Any) -> None:
        """On the master: a worker's chunk."""
        self._journal(msg.data)
        if msg.data.get("final"):
            self.finals.add(str(msg.node_id))

    def on_flush(self, environment: Environment, msg: Any, **_: Any) -> None:
        """On a worker: the master is about to quit; stop the users (test_stop then sends
        the final chunk)."""
        runner = environment.runner
        if runner is not None:
            runner.stop()

    def on_test_stopping(self, environment: Environment, **_: Any) -> None:
        runner = environment.runner
        if not isinstance(runner, MasterRunner):
            return
        waiting = {client.id for client in runner.clients.all} - self.finals
        if not waiting:
            return
        for client in waiting:
            runner.send_message(_FLUSH, None, client_id=client)
        deadline = time.monotonic() + (environment.stop_timeout or 0) + FINAL_GRACE_S
        while waiting - self.finals and time.monotonic() < deadline:
            gevent.sleep(0.05)
        if missing := waiting - self.finals:
            log.warning("no final chunk from Locust workers %s", ", ".join(sorted(missing)))

    def on_test_stop(self, environment: Environment, **_: Any) -> None:
        if not self.generates_load:
            return
        for greenlet in self._greenlets:
            greenlet.kill(block=False)
        self._greenlets = []
        self.flush(final=True)

    def on_quitting(self, environment: Environment, **_: Any) -> None:
        if self.generates_load:
            self.flush()  # whatever came after the users stopped
        if self.out is None or isinstance(environment.runner, WorkerRunner):
            return
        self.out.mkdir(parents=True, exist_ok=True)
        marker = {"started_at": self.started_at, "stopped_at": time.time()}
        (self.out / OUTPUT_FILE).write_text(json.dumps(marker))


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    parser.add_argument(
        "--hdr-out",
        default="",
        help="directory for the µs HdrHistograms of every request (mailbench)",
        include_in_web_ui=False,
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=0.0,
        help="seconds from the first request whose requests stay out of the summary "
        "histograms (mailbench)",
        include_in_web_ui=False,
    )


@events.init.add_listener
def _install(environment: Environment, **_: Any) -> None:
    global _RECORDER
    _RECORDER = HdrRecorder(environment)


_RECORDER: HdrRecorder | None = None


def request_starting() -> None:
    """Call before a visit's first request: the first one of the process starts its
    warm-up and second 0 of its timeline."""
    if _RECORDER is not None:
        _RECORDER.record.request_starting(time.time())


def note_send(recipient: str) -> None:
    """Call before posting a send to ``recipient``: the accounting then knows it was
    attempted even if the test ends before its answer (or its request event) comes."""
    if _RECORDER is not None:
        _RECORDER.record.sends_started.append(recipient)


def record_unanswered(visit: Visit, now: float) -> None:
    """An open-model visit the load stopped before it was answered: each of its
    unanswered requests, from its intended start until ``now`` (perf_counter)."""
    if _RECORDER is None:
        return
    wall = time.time()
    for name, seconds in visit.unanswered(now):
        intended_at = wall - (now - visit.intended)
        _RECORDER.record.record_unanswered(name, seconds * 1_000_000, intended_at, wall)
