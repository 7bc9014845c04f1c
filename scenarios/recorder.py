"""A Locust plugin that records every request's time in microseconds.

Locust's own statistics round anything under 100 ms to whole milliseconds, so a 150 µs
form page reads as 0. This plugin takes each time from the ``request`` event into an
HdrHistogram per request name (and per second, for the time series). Locust workers
(``--processes`` or distributed) ship their histograms to the master with every stats
report; the master merges them and writes one file when it quits. Percentiles are never
averaged across processes.

It also keeps the client's side of the loss accounting: every ``send`` request whose
``context`` names a ``recipient`` (unique per visit, see :mod:`scenarios.users`) is
listed as acknowledged (a 2xx; with the time the send was posted) or failed. The harness matches
these against the fake Mailgun's ledger, so servers it did not start, servers killed
mid-run and several server processes are all accounted for in the same way.

Enable it by importing this module in a locustfile and passing ``--hdr-out DIR``.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import gevent
import psutil
from locust import events
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

from servers.metrics import Recorder

OUTPUT_FILE = "locust-hdr.json"
_MESSAGE_KEY = "mailbench_hdr"


class HdrRecorder:
    def __init__(self, environment: Environment) -> None:
        self.environment = environment
        self.total = Recorder()
        self.per_second: defaultdict[int, Recorder] = defaultdict(Recorder)
        self.errors: defaultdict[str, int] = defaultdict(int)
        self.errors_per_second: defaultdict[int, defaultdict[str, int]] = defaultdict(
            lambda: defaultdict(int)
        )
        self.cpu_warnings = 0
        self.cpu_samples: list[float] = []  # this process's CPU %, once a second
        self.counters: defaultdict[str, int] = defaultdict(int)  # open-model start counts
        self.sends_ok: list[tuple[str, float]] = []  # (recipient, when it was posted)
        self.sends_failed: list[str] = []  # recipients of sends without a 2xx
        # Recipients of sends started: one cut short when Locust stops never fires a
        # request event, yet its job may have been taken (see note_send).
        self.sends_started: list[str] = []
        environment.mailbench_counters = self.counters  # type: ignore[attr-defined]
        self.started_at = time.time()
        ev = environment.events
        ev.request.add_listener(self.on_request)
        ev.report_to_master.add_listener(self.on_report_to_master)
        ev.worker_report.add_listener(self.on_worker_report)
        ev.cpu_warning.add_listener(self.on_cpu_warning)
        ev.quitting.add_listener(self.on_quitting)
        ev.test_start.add_listener(self.on_test_start)
        self._sampler: gevent.Greenlet | None = None

    def on_test_start(self, environment: Environment, **_: Any) -> None:
        if self._sampler is None and not isinstance(environment.runner, MasterRunner):
            self._sampler = gevent.spawn(self._sample_cpu)

    def _sample_cpu(self) -> None:
        # The generator's own CPU: a saturated generator reports its own queueing.
        process = psutil.Process()
        process.cpu_percent(None)
        while True:
            gevent.sleep(1.0)
            self.cpu_samples.append(process.cpu_percent(None))

    def on_request(
        self,
        name: str,
        response_time: float,
        exception: BaseException | None = None,
        context: dict[str, Any] | None = None,
        **_: Any,
    ) -> None:
        now = time.perf_counter()
        wall = time.time()
        second = int(wall)
        recipient = (context or {}).get("recipient")
        if recipient is not None:
            if exception is None:
                # When the send was posted: delivery lag runs from the user's click.
                self.sends_ok.append((recipient, wall - response_time / 1000.0))
            else:
                self.sends_failed.append(recipient)
        if exception is not None:
            self.errors[name] += 1
            self.errors_per_second[second][name] += 1
            return
        micros = response_time * 1000.0  # Locust reports perf_counter milliseconds as float
        self.total.record_us(name, micros)
        self.per_second[second].record_us(name, micros)
        intended = (context or {}).get("intended")
        if intended is not None:
            # Open model: also from the visit's scheduled start (coordinated omission).
            from_intended = (now - intended) * 1_000_000
            self.total.record_us(f"{name}_intended", from_intended)
            self.per_second[second].record_us(f"{name}_intended", from_intended)

    def on_cpu_warning(self, **_: Any) -> None:
        self.cpu_warnings += 1

    def export(self) -> dict[str, Any]:
        return {
            "histograms": self.total.encoded(),
            "errors": dict(self.errors),
            "cpu_warnings": self.cpu_warnings,
            "cpu_samples": list(self.cpu_samples),
            "counters": dict(self.counters),
            "sends_ok": list(self.sends_ok),
            "sends_failed": list(self.sends_failed),
            "sends_started": list(self.sends_started),
            "seconds": {str(s): r.encoded() for s, r in sorted(self.per_second.items())},
            "errors_per_second": {
                str(s): dict(e) for s, e in sorted(self.errors_per_second.items())
            },
        }

    def merge(self, data: dict[str, Any]) -> None:
        self.total.add_encoded(data.get("histograms", {}))
        for name, n in data.get("errors", {}).items():
            self.errors[name] += n
        self.cpu_warnings += data.get("cpu_warnings", 0)
        self.cpu_samples += data.get("cpu_samples", [])
        for name, n in data.get("counters", {}).items():
            self.counters[name] += n
        self.sends_ok += [(str(r), float(t)) for r, t in data.get("sends_ok", [])]
        self.sends_failed += [str(r) for r in data.get("sends_failed", [])]
        self.sends_started += [str(r) for r in data.get("sends_started", [])]
        for second, encoded in data.get("seconds", {}).items():
            self.per_second[int(second)].add_encoded(encoded)
        for second, errors in data.get("errors_per_second", {}).items():
            for name, n in errors.items():
                self.errors_per_second[int(second)][name] += n

    def _clear(self) -> None:
        self.total.reset()
        self.per_second.clear()
        self.errors.clear()
        self.errors_per_second.clear()
        self.cpu_warnings = 0
        self.cpu_samples.clear()
        self.counters.clear()
        self.sends_ok.clear()
        self.sends_failed.clear()
        self.sends_started.clear()

    def on_report_to_master(self, client_id: str, data: dict[str, Any]) -> None:
        # Each report carries what was recorded since the last one; the master adds it up.
        data[_MESSAGE_KEY] = self.export()
        self._clear()

    def on_worker_report(self, client_id: str, data: dict[str, Any]) -> None:
        self.merge(data.get(_MESSAGE_KEY, {}))

    def on_quitting(self, environment: Environment, **_: Any) -> None:
        out = getattr(environment.parsed_options, "hdr_out", None)
        if not out or isinstance(environment.runner, WorkerRunner):
            return
        path = Path(out) / OUTPUT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = self.export()
        payload["started_at"] = self.started_at
        payload["stopped_at"] = time.time()
        path.write_text(json.dumps(payload))


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    parser.add_argument(
        "--hdr-out",
        default="",
        help="directory for the µs HdrHistograms of every request (mailbench)",
        include_in_web_ui=False,
    )


@events.init.add_listener
def _install(environment: Environment, **_: Any) -> None:
    global _RECORDER
    _RECORDER = HdrRecorder(environment)


_RECORDER: HdrRecorder | None = None


def note_send(recipient: str) -> None:
    """Call before posting a send to ``recipient``: the accounting then knows it was
    attempted even if the test ends before its answer (or its request event) comes."""
    if _RECORDER is not None:
        _RECORDER.sends_started.append(recipient)
