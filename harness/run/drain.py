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
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx

from harness.results.accounting import Accounting, reconcile
from harness.results.collect import client_sends, dead_lettered_recipients
from harness.run.depth import open_probe
from harness.run.tiers import Tiers
from servers.fakegun.admin import FakegunAdmin

Supervise = Callable[[], int]  # replaces the workers that died; how many it replaced


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
    queue = None
    if tiers.queue_url:
        # The mode's own probe where it has one (a framework's queue), as the sampler's.
        queue = await open_probe(tiers.queue_url, tiers.queue_name, None, tiers.mode)
    settled_polls = 0
    previous_ledger = -1
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
                previous_ledger = len(ledger)
                settled_polls = settled_polls + 1 if counts.lost == 0 and quiet else 0
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
