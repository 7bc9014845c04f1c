"""The fake Mailgun's ledger: every accepted message, the ground truth of a run.

The harness counts deliveries, duplicates and loss against it (``GET /_mailbench/ledger``
serves :meth:`LedgerEntry.as_json` of each entry, oldest first).
"""

from __future__ import annotations

from typing import Any, NamedTuple


class LedgerEntry(NamedTuple):
    """One accepted message."""

    message_id: str
    idempotency_key: str | None
    domain: str
    recipients: list[str]
    subject: str
    received_at: float
    accepted_at: float
    testmode: bool

    def as_json(self) -> dict[str, Any]:
        return self._asdict()


class Ledger:
    """Every accepted message, kept column by column.

    Strings, floats and booleans in eight lists are objects the garbage collector does
    not track, so a ledger of millions of messages adds nothing to a collection, where
    an object per message would (see ``servers.fakegun.cli.cli_main`` on why that matters).
    """

    def __init__(self) -> None:
        self._columns: tuple[list[Any], ...] = tuple([] for _ in LedgerEntry._fields)

    def append(
        self,
        message_id: str,
        idempotency_key: str | None,
        domain: str,
        recipients: list[str],
        subject: str,
        received_at: float,
        accepted_at: float,
        testmode: bool,
    ) -> None:
        ids, keys, domains, tos, subjects, received, accepted, test = self._columns
        ids.append(message_id)
        keys.append(idempotency_key)
        domains.append(domain)
        tos.append("\n".join(recipients))  # one string: no address holds a newline
        subjects.append(subject)
        received.append(received_at)
        accepted.append(accepted_at)
        test.append(testmode)

    def __len__(self) -> int:
        return len(self._columns[0])

    def entries(self) -> list[LedgerEntry]:
        ids, keys, domains, tos, subjects, received, accepted, test = self._columns
        rows = zip(ids, keys, domains, tos, subjects, received, accepted, test, strict=True)
        return [
            LedgerEntry(i, k, d, r.split("\n") if r else [], s, at, done, t)
            for i, k, d, r, s, at, done, t in rows
        ]
