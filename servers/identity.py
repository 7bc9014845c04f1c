"""How a process the harness starts proves it is that process, and not whatever else
answers on its port.

The harness draws a fresh token for every process it starts and passes it in the
environment variable :data:`IDENTITY_VAR` (never argv: ``ps`` shows command lines to every
user). A server answers it on its admin endpoint — the fake Mailgun in
``GET /_mailbench/stats``, the reference server in ``GET /_mailbench/metrics``, the
calibration server in ``GET /_mailbench/stats`` — as ``"identity"``. The harness calls a
process ready only once the port answers with the token it just drew; any other answer
comes from a process it did not start (one left running by hand, say), and the port is
then reported as taken, before anything is reset or measured.

A process started by hand has no token and answers ``null``.
"""

from __future__ import annotations

from collections.abc import Mapping

IDENTITY_VAR = "MAILBENCH_IDENTITY"


def identity_from(environ: Mapping[str, str]) -> str | None:
    """The token this process was started with, if the harness started it."""
    return environ.get(IDENTITY_VAR) or None
