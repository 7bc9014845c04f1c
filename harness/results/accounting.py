"""Jepsen-style total-queue accounting: was every accepted email delivered exactly once?

Every send the load generator makes goes to a recipient address used for that send
only, so the fake Mailgun's ledger says which sends reached the API, whatever server
made the call (one of ours, several, or an app in another language). Per mode:

* ``accepted`` — sends the server answered 2xx (the promise);
* ``delivered`` — accepted sends found in the ledger;
* ``duplicates`` — extra ledger entries of one send (any send, accepted or not);
* ``dead_lettered`` — accepted sends a worker gave up on, with a reason, and never
  delivered;
* ``lost = accepted − delivered − dead_lettered`` — must be 0;
* ``unexpected`` — ledger entries of no send the generator made — must be 0;
* ``unacknowledged`` — sends delivered although their reply was not a 2xx (it was cut
  by the end of the run or a crash, or the server failed after the broker had taken
  the job). Not an error: the outcome of such a send was unknown to its client.

The verdict is :attr:`Accounting.sound` (nothing lost, nothing unexpected), and what a
table shows for it :attr:`Accounting.verdict`: every report, the chaos table and the CI
gate ask these two, never the counts themselves.

Test-mode ledger entries (``o:testmode``) are not deliveries and are ignored.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from hdrh.histogram import HdrHistogram

from servers.metrics import new_histogram, record_us

COLUMNS = (
    "accepted",
    "delivered",
    "duplicates",
    "dead_lettered",
    "lost",
    "unexpected",
    "unacknowledged",
)
Verdict = Literal["ok", "duplicates", "FAILED"]
FAILED: Verdict = "FAILED"


@dataclass(frozen=True, slots=True)
class Accounting:
    accepted: int
    delivered: int
    duplicates: int
    dead_lettered: int
    lost: int
    unexpected: int
    unacknowledged: int = 0

    def as_row(self) -> dict[str, int]:
        return asdict(self)

    def __add__(self, other: Accounting) -> Accounting:
        """Counts of two runs (or modes) together."""
        mine, theirs = self.as_row(), other.as_row()
        return Accounting(**{column: mine[column] + theirs[column] for column in COLUMNS})

    @property
    def sound(self) -> bool:
        """Nothing lost and nothing delivered that nobody sent."""
        return self.lost == 0 and self.unexpected == 0

    @property
    def verdict(self) -> Verdict:
        """The label tables show: ``FAILED`` unless :attr:`sound`; ``duplicates`` when
        sound but a send was delivered more than once (at-least-once delivery allows it,
        an idempotent API would not); else ``ok``. Markdown callers add their own bold."""
        if not self.sound:
            return FAILED
        return "duplicates" if self.duplicates else "ok"


def recipient_of(entry: Mapping[str, Any]) -> str | None:
    """The send a ledger entry belongs to: its first recipient, case-folded."""
    recipients = entry.get("recipients") or []
    return str(recipients[0]).casefold() if recipients else None


def reconcile(
    accepted: Sequence[tuple[str, float]],
    ledger: Iterable[Mapping[str, Any]],
    dead_lettered: Iterable[str] = (),
    failed: Iterable[str] = (),
) -> tuple[Accounting, HdrHistogram]:
    """Count outcomes and measure delivery lag (send posted → first accepted by the API)
    for every accepted send delivered.

    ``accepted`` holds ``(recipient, time the send was posted)``, ``failed`` the recipients of sends
    that got no 2xx, ``dead_lettered`` the recipients of dead-lettered jobs.
    """
    accepted_at = {recipient.casefold(): at for recipient, at in accepted}
    attempted = accepted_at.keys() | {recipient.casefold() for recipient in failed}
    first_delivery: dict[str, float] = {}
    deliveries: Counter[str] = Counter()
    unexpected = 0
    for entry in ledger:
        if entry.get("testmode"):
            continue
        key = recipient_of(entry)
        if key is None or key not in attempted:
            unexpected += 1
            continue
        deliveries[key] += 1
        at = float(entry["accepted_at"])
        if key not in first_delivery or at < first_delivery[key]:
            first_delivery[key] = at

    lag = new_histogram()
    for key, at in first_delivery.items():
        if key in accepted_at:
            # Clocks of two processes: never below the histogram's floor.
            record_us(lag, max(0.0, at - accepted_at[key]) * 1_000_000)

    delivered = sum(1 for key in accepted_at if key in first_delivery)
    dead = {key.casefold() for key in dead_lettered}
    dead &= accepted_at.keys() - first_delivery.keys()
    counts = Accounting(
        accepted=len(accepted_at),
        delivered=delivered,
        duplicates=sum(n - 1 for n in deliveries.values()),
        dead_lettered=len(dead),
        lost=len(accepted_at) - delivered - len(dead),
        unexpected=unexpected,
        unacknowledged=len(first_delivery) - delivered,
    )
    return counts, lag
