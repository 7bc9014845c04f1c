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

Beside the emails, the requests they came from (summary.csv's form and send rows, the
same measured window):

* ``requests`` — form and send requests the load generator made;
* ``failed_requests`` — those that failed (no 2xx, or no answer).

The verdict is :attr:`Accounting.sound` — nothing lost, nothing unexpected, and no more
than half the requests failed (a mode that mostly failed measured its failures, not the
server: a dead target, a crashed server) — and what a table shows for it
:attr:`Accounting.verdict`, why in :attr:`Accounting.reasons`: every report, the chaos
table and the CI gate ask these, never the counts themselves.

Test-mode ledger entries (``o:testmode``) are not deliveries and are ignored.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from hdrh.histogram import HdrHistogram

from servers.metrics import new_histogram, record_us

EMAIL_COUNTS = (
    "accepted",
    "delivered",
    "duplicates",
    "dead_lettered",
    "lost",
    "unexpected",
    "unacknowledged",
)
REQUEST_COUNTS = ("requests", "failed_requests")
COLUMNS = (*EMAIL_COUNTS, *REQUEST_COUNTS)
Verdict = Literal["ok", "duplicates", "FAILED"]
FAILED: Verdict = "FAILED"
# The requests whose failures are judged: what the load generator asks of the server.
JUDGED_REQUESTS = ("form", "send")
MOST_FAILED = 0.5  # a share of failed requests above this is not a measurement


@dataclass(frozen=True, slots=True)
class Accounting:
    accepted: int
    delivered: int
    duplicates: int
    dead_lettered: int
    lost: int
    unexpected: int
    unacknowledged: int = 0
    # 0 and 0 in folders written before these columns: the share is not judged there.
    requests: int = 0
    failed_requests: int = 0

    def as_row(self) -> dict[str, int]:
        return asdict(self)

    def with_requests(self, answered: Mapping[str, int], failed: Mapping[str, int]) -> Accounting:
        """These counts with the load generator's requests: ``answered`` (successes, the
        histograms' counts) and ``failed`` (summary.csv's ``errors``), by metric."""
        made = sum(answered.get(m, 0) + failed.get(m, 0) for m in JUDGED_REQUESTS)
        return replace(
            self, requests=made, failed_requests=sum(failed.get(m, 0) for m in JUDGED_REQUESTS)
        )

    def __add__(self, other: Accounting) -> Accounting:
        """Counts of two runs (or modes) together."""
        mine, theirs = self.as_row(), other.as_row()
        return Accounting(**{column: mine[column] + theirs[column] for column in COLUMNS})

    @property
    def mostly_failed(self) -> bool:
        """More than half the form and send requests failed."""
        return self.failed_requests > self.requests * MOST_FAILED

    @property
    def failures(self) -> str | None:
        """``"56 of 56 requests failed"`` when most requests failed, else None."""
        if not self.mostly_failed:
            return None
        return f"{self.failed_requests:,} of {self.requests:,} requests failed"

    @property
    def reasons(self) -> list[str]:
        """Why the verdict is ``FAILED``, in words: ``["3 lost", "56 of 56 requests
        failed"]``; empty when :attr:`sound`."""
        found = [f"{self.lost:,} lost"] if self.lost else []
        found += [f"{self.unexpected:,} unexpected"] if self.unexpected else []
        return found + ([self.failures] if self.failures else [])

    @property
    def sound(self) -> bool:
        """Nothing lost, nothing delivered that nobody sent, and most requests answered."""
        return not self.reasons

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
