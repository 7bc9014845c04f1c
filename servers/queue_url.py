"""Where a server or a worker finds its queue URL: its option, or else the environment.

A queue URL can carry the broker's password, and a command line is shown to every user
of the machine (``ps``, ``/proc/PID/cmdline``), while a process's environment is its
owner's alone. The harness therefore hands the URL to the servers and workers it starts
in :data:`QUEUE_URL_VAR`; the options (``--queue-url``, ``--backend``) stay for people
starting a process by hand, with a warning when the URL they give there has a password.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from queues.urls import redact_url

log = logging.getLogger(__name__)

QUEUE_URL_VAR = "MAILBENCH_QUEUE_URL"


def queue_url_from(option: str | None, environ: Mapping[str, str], flag: str) -> str | None:
    """The URL given by the option ``flag`` (``option``), else ``$MAILBENCH_QUEUE_URL``."""
    if option:
        if redact_url(option) != option:
            log.warning(
                "the queue URL given with %s has a password, which every user of this "
                "machine can read from the command line (ps); set %s instead",
                flag,
                QUEUE_URL_VAR,
            )
        return option
    return environ.get(QUEUE_URL_VAR) or None
