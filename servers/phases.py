"""Phases of one process's figures, as the harness cuts a mode's run into them.

A mode's run has phases: the warm-up, the main load and, with ``--profile full``, each
step of the load sweep. Every figure belongs to exactly one of them: the results take the
main phase's, each sweep step keeps its own, the warm-up's are set aside. The harness
names the phases in a small JSON control file that every server and worker of the mode
follows (``--phase-file``)::

    {"phases": [{"folder": "warmup", "begins_at": null},
                {"folder": ".", "begins_at": 1764612345.25},
                {"folder": "sweep/step-00", "begins_at": 1764612380.5}]}

``begins_at`` is wall-clock time (``time.time()``; ``null``: since the process started),
the same instant for every process and for the load generator, whose warm-up ends its
first request plus ``--warmup`` seconds. ``folder`` is relative to the process's metrics
file: at shutdown each phase's histograms go to ``<folder>/<metrics file's name>``, and
the main phase's (``.``) to the metrics file itself, with the counts the process keeps
over its whole life.

A value goes to the phase in which the operation it times *began* (now minus its
duration): an API call in flight at a boundary, or a job accepted before it and claimed
after it, stays with the phase it started in. So "sent after the warm-up" means the same
for the load generator, the servers and the workers, and a phase's figures are those of
its own load. The harness writes the file atomically; a process reads it at start (one
started mid-run, such as a replacement worker, then knows the phases so far) and again
whenever it changes, looking every :data:`POLL_S` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hdrh.histogram import HdrHistogram

from servers.metrics import Recorder, encode, new_histogram, record_us

log = logging.getLogger(__name__)

MAIN = "."  # the main phase's folder: the metrics file's own
POLL_S = 0.1

PhaseSpec = tuple[str, float | None]  # (folder, begins_at; None: from the start)


@dataclass(slots=True)
class Phase:
    folder: str
    begins_at: float  # -inf for the first phase
    histograms: dict[str, HdrHistogram] = field(default_factory=dict)


class PhasedRecorder(Recorder):
    """A :class:`~servers.metrics.Recorder` whose values go to the phase in which the
    operation they time began. ``histograms`` (and so ``encoded``) are the current
    phase's; with no phases set it is a plain recorder with one phase, the main one."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self._clock = clock
        self.phases = [Phase(MAIN, -math.inf, self.histograms)]
        self._begins = [-math.inf]

    def set_phases(self, specs: Sequence[PhaseSpec]) -> None:
        """Take the phases the control file names (what was recorded is kept, by folder)."""
        known = {phase.folder: phase for phase in self.phases}
        phases: list[Phase] = []
        for folder, begins_at in specs:
            if any(p.folder == folder for p in phases):
                continue
            phase = known.get(folder) or Phase(folder, -math.inf)
            phase.begins_at = -math.inf if begins_at is None else float(begins_at)
            phases.append(phase)
        if not phases:
            return
        phases.sort(key=lambda p: p.begins_at)
        phases[0].begins_at = -math.inf  # whatever began before the first boundary
        self.phases = phases
        self._begins = [p.begins_at for p in phases]
        self.histograms = phases[-1].histograms

    def record_us(self, name: str, micros: float) -> None:
        histograms = self.histograms
        if len(self._begins) > 1:
            began = self._clock() - micros / 1_000_000
            if began < self._begins[-1]:
                histograms = self.phases[bisect.bisect_right(self._begins, began) - 1].histograms
        histogram = histograms.get(name)
        if histogram is None:
            histogram = histograms[name] = new_histogram()
        record_us(histogram, micros)

    @property
    def current(self) -> str:
        return self.phases[-1].folder


def add_phase_argument(parser: argparse.ArgumentParser) -> None:
    """``--phase-file``, for every process that keeps its histograms by phase."""
    parser.add_argument(
        "--phase-file",
        type=Path,
        help="follow the phases of the run that this control file names (the harness "
        "writes it): each phase's histograms go to their own folder",
    )


def read_control(path: Path) -> list[PhaseSpec] | None:
    """The phases a control file names; None if it is missing or does not parse."""
    try:
        data = json.loads(path.read_text())
        return [(str(p["folder"]), p.get("begins_at")) for p in data["phases"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_control(path: Path, phases: Sequence[PhaseSpec]) -> None:
    """Write a control file atomically (the harness's side)."""
    payload = {"phases": [{"folder": f, "begins_at": at} for f, at in phases]}
    _write_atomically(path, payload)


class PhaseFile:
    """Keeps a :class:`PhasedRecorder` on the phases its control file names."""

    def __init__(self, path: Path | None, recorder: PhasedRecorder) -> None:
        self.path = path
        self.recorder = recorder
        self._seen: tuple[int, int, int] | None = None

    def check(self) -> None:
        """Read the control file if it changed since the last look."""
        if self.path is None:
            return
        try:
            stat = self.path.stat()
        except OSError:
            return
        signature = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if signature == self._seen:
            return
        specs = read_control(self.path)
        if specs is not None:
            self._seen = signature
            before = self.recorder.current
            self.recorder.set_phases(specs)
            if self.recorder.current != before:
                log.info("figures now go to phase %r", self.recorder.current)

    async def follow(self) -> None:
        """Check every :data:`POLL_S` seconds until cancelled."""
        while True:
            self.check()
            await asyncio.sleep(POLL_S)


def write_phases(path: Path, recorder: PhasedRecorder, counts: Mapping[str, object]) -> None:
    """Write each phase's histograms to ``<folder>/<path's name>`` beside ``path``; the
    main phase's, with ``counts``, to ``path`` itself (empty histograms if the process
    had no main phase)."""
    phases = recorder.phases
    if not any(phase.folder == MAIN for phase in phases):
        phases = [*phases, Phase(MAIN, -math.inf)]
    for phase in phases:
        payload: dict[str, object] = dict(counts) if phase.folder == MAIN else {}
        payload["phase"] = phase.folder
        payload["begins_at"] = phase.begins_at if phase.begins_at > -math.inf else None
        payload["histograms"] = {name: encode(h) for name, h in phase.histograms.items()}
        _write_atomically(path.parent / phase.folder / path.name, payload)


def _write_atomically(path: Path, payload: Mapping[str, object]) -> None:
    # Write then rename, so a reader never sees half a file.
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(payload))
    os.replace(partial, path)
