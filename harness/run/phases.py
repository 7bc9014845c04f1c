"""The harness's side of a mode's phases (see :mod:`servers.phases`).

:class:`PhaseClock` writes ``raw/<mode>/phases.json``, the control file the mode's
servers and workers follow: the warm-up from the start, the main load from the warm-up's
end, each sweep step from the moment the harness starts it. The file stays in the
results as the record of those instants.

The warm-up ends ``--warmup`` seconds after the load's first request, as the load
generator counts it. The harness learns when that was from the server
(``GET /_mailbench/phase``), while the warm-up runs, and names the instant ahead, so
every process changes phase at the same moment, whatever it has in flight.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from servers.phases import MAIN, PhaseSpec, write_control

CONTROL_FILE = "phases.json"
WARMUP = "warmup"


class PhaseClock:
    def __init__(self, raw: Path, warmup_s: float) -> None:
        self.path = raw / CONTROL_FILE
        self.warmup_s = warmup_s
        first = WARMUP if warmup_s > 0 else MAIN
        self.phases: list[PhaseSpec] = [(first, None)]
        write_control(self.path, self.phases)

    @property
    def in_warmup(self) -> bool:
        return self.phases[-1][0] == WARMUP

    def begin(self, folder: str, at: float | None = None) -> None:
        """Phase ``folder`` begins at ``at`` (wall clock; default now)."""
        self.phases.append((folder, time.time() if at is None else at))
        write_control(self.path, self.phases)

    def watch_warmup(self, base_url: str) -> None:
        """While the warm-up runs: once the server has seen the first request, the main
        phase begins ``warmup_s`` after it."""
        if not self.in_warmup:
            return
        first = first_request_at(base_url)
        if first is not None:
            self.begin(MAIN, first + self.warmup_s)


def first_request_at(base_url: str) -> float | None:
    """When the server behind ``base_url`` had its first request (wall clock); None
    before it, or from a server that does not say."""
    try:
        answer = httpx.get(f"{base_url}/_mailbench/phase", timeout=1.0).json()
        at = answer.get("first_request_at")
        return None if at is None else float(at)
    except (httpx.HTTPError, ValueError, AttributeError, TypeError):
        return None
