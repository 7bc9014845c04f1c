"""After the load: wait, bounded, until every accepted send has an outcome.

An outcome is a delivery in the fake's ledger or a worker's dead letter. With a queue
(ours, or maybe a target's) the drain also waits until the queue is quiet twice in a row,
so that late redeliveries, and their duplicates, are counted too. Not the queue's depth
alone: a broker may not count what another process holds unacknowledged (RabbitMQ);
only outcomes prove the drain.

Meanwhile it calls ``supervise`` at every poll, which replaces workers that died: the
jobs a dead worker held come back after its lease, so the drain waits that much longer
(``grace_s``) for each worker replaced. A poison job, which kills every worker it
reaches until one dead-letters it, so ends the drain instead of stalling it.

Two kinds of mode lose mail by design, and the drain does not wait for it to come back:

* a background mode (:attr:`servers.modes.Kind.BACKGROUND`) keeps its sends in the
  server's memory, whose tasks in flight the server counts (``/_mailbench/depth``, over a
  new connection each time, so that with several server processes the polls reach each
  of them); once none is left, nothing lost can still arrive;
* a mode that never retries (``retries=False``: ``naive``) is done once its queue is
  empty and the ledger has stayed still for longer than one API call can take.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import httpx

from harness.results.accounting import Accounting, reconcile
from harness.results.collect import client_sends, dead_lettered_recipients
from harness.run.depth import Probe, open_probe
from harness.run.tiers import Tiers
from servers.fakegun.admin import FakegunAdmin
from servers.mailgun import MailgunSettings
from servers.modes import Kind

log = logging.getLogger(__name__)

Supervise = Callable[[], int]  # replaces the workers that died; how many it replaced
# How long the ledger must stay still before a mode without retries is done: longer
# than the client's timeout, the longest an API call in flight can take.
STILL_S = MailgunSettings().timeout + 2.0


class ServerBacklog:
    """The sends in flight of a background mode's servers, as they count them."""

    def __init__(self, base_url: str) -> None:
        self.url = f"{base_url}/_mailbench/depth"

    async def depth(self) -> int:
        """The count, or -1 (never quiet) while a server does not answer (restarting)."""
        # A client per poll: one kept alive would always ask the same server process.
        try:
            async with httpx.AsyncClient(timeout=5.0) as http:
                response = await http.get(self.url)
                response.raise_for_status()
                return int(response.json()["depth"])
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            log.debug("no count of the sends in flight: %r", exc)
            return -1

    async def close(self) -> None:
        pass


def drain(
    tiers: Tiers,
    fake: FakegunAdmin,
    timeout_s: float,
    quiet_polls: int,
    supervise: Supervise | None = None,
    grace_s: float = 0.0,
) -> bool:
    """True once drained; False if ``timeout_s`` passed first (plus ``grace_s`` per
    worker ``supervise`` replaced). ``quiet_polls``: how many polls in a row must find
    nothing left (1 where every email is sent in the request)."""
    return asyncio.run(_drain(tiers, fake, timeout_s, quiet_polls, supervise, grace_s))


async def _drain(
    tiers: Tiers,
    fake: FakegunAdmin,
    timeout_s: float,
    quiet_polls: int,
    supervise: Supervise | None,
    grace_s: float,
) -> bool:
    accepted, failed = client_sends(tiers.raw)
    deadline = time.monotonic() + timeout_s
    queue: Probe | None = None
    mode = tiers.mode
    background = mode is not None and mode.kind is Kind.BACKGROUND
    if tiers.queue_url:
        # The mode's own probe where it has one (a framework's queue), as the sampler's.
        queue = await open_probe(tiers.queue_url, tiers.queue_name, None, tiers.mode)
    elif background:
        queue = ServerBacklog(tiers.base_url)
        quiet_polls *= max(1, len(tiers.servers))  # each poll reaches one at random
    never_retries = mode is not None and not mode.retries
    settled_polls = 0
    previous_ledger = -1
    still_since = time.monotonic()
    try:
        async with httpx.AsyncClient() as http:
            while True:
                if supervise is not None:
                    deadline += grace_s * supervise()
                ledger = await fake.ledger_async(http)
                dead = dead_lettered_recipients(tiers.raw)
                counts, _ = reconcile(accepted, ledger, dead, failed)
                depth = await queue.depth() if queue is not None else None
                if queue is not None:
                    quiet = depth == 0
                else:  # nothing to ask: the ledger has stopped growing
                    quiet = quiet_polls == 1 or len(ledger) == previous_ledger
                if len(ledger) != previous_ledger:
                    still_since = time.monotonic()
                previous_ledger = len(ledger)
                # Nothing lost can still arrive: no task left, or no retry ever made.
                final = background or (never_retries and time.monotonic() - still_since > STILL_S)
                done = quiet and (counts.lost == 0 or final)
                settled_polls = settled_polls + 1 if done else 0
                if settled_polls >= quiet_polls:
                    return True
                if time.monotonic() > deadline:
                    return False
                _progress(tiers.name, counts, depth)
                await asyncio.sleep(1.0)
    finally:
        if queue is not None:
            await queue.close()


def _progress(name: str, counts: Accounting, depth: int | None) -> None:
    queued = f"{depth} jobs queued, " if depth is not None else ""
    print(
        f"[{name:>8}] draining: {queued}{counts.delivered + counts.dead_lettered}"
        f"/{counts.accepted} delivered or dead-lettered",
        flush=True,
    )
