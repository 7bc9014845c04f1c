"""Jepsen-style total-queue accounting: was every accepted email delivered exactly once?

``accepted`` are the jobs the server answered 2xx for, ``delivered`` the distinct ones
the (fake) API's ledger holds, ``duplicates`` the extra deliveries of a key,
``dead_lettered`` the accepted jobs the workers gave up on (with a reason),
``lost = accepted − delivered − dead_lettered`` (must be 0) and ``unexpected`` the ledger
entries no 2xx promised (must be 0).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from hdrh.histogram import HdrHistogram

from harness.metrics import new_histogram, record_us

COLUMNS = ("accepted", "delivered", "duplicates", "dead_lettered", "lost", "unexpected")


@dataclass(frozen=True, slots=True)
class Accounting:
    accepted: int
    delivered: int
    duplicates: int
    dead_lettered: int
    lost: int
    unexpected: int

    def as_row(self) -> dict[str, int]:
        return asdict(self)


def reconcile(
    accepted: Sequence[tuple[str, float]],
    ledger: Iterable[Mapping[str, Any]],
    dead_lettered: Iterable[str] = (),
) -> tuple[Accounting, HdrHistogram]:
    """Count outcomes and measure delivery lag (accepted by the server → first accepted by
    the API) for every delivered job."""
    accepted_at = dict(accepted)
    first_delivery: dict[str, float] = {}
    deliveries: Counter[str] = Counter()
    unexpected = 0
    for entry in ledger:
        if entry.get("testmode"):
            continue
        key = entry.get("idempotency_key")
        if key is None or key not in accepted_at:
            unexpected += 1
            continue
        deliveries[key] += 1
        at = float(entry["accepted_at"])
        if key not in first_delivery or at < first_delivery[key]:
            first_delivery[key] = at

    lag = new_histogram()
    for key, at in first_delivery.items():
        record_us(lag, (at - accepted_at[key]) * 1_000_000)

    dead = {key for key in dead_lettered if key in accepted_at and key not in first_delivery}
    delivered = len(first_delivery)
    counts = Accounting(
        accepted=len(accepted_at),
        delivered=delivered,
        duplicates=sum(n - 1 for n in deliveries.values()),
        dead_lettered=len(dead),
        lost=len(accepted_at) - delivered - len(dead),
        unexpected=unexpected,
    )
    return counts, lag
