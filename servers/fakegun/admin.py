"""A client of the fake Mailgun's admin API (``/_mailbench/*``): the one place that
speaks it, for the harness and the tests.

The paths and their answers are the fake's contract, described in
:mod:`servers.fakegun`: ``GET /_mailbench/stats``, ``GET /_mailbench/ledger`` and
``POST /_mailbench/reset``. A fake that does not answer is one sentence
(:class:`~queues.errors.ServiceUnavailable`), not an httpx traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from queues.errors import ServiceUnavailable

Entry = dict[str, Any]  # LedgerEntry.as_json()


@contextmanager
def _answers(url: str, what: str) -> Iterator[None]:
    try:
        yield
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        raise ServiceUnavailable(
            f"the fake Mailgun at {url} did not answer {what} ({exc or type(exc).__name__}); "
            "is it running?"
        ) from exc


class FakegunAdmin:
    """``FakegunAdmin("http://127.0.0.1:8025")``; every call is one HTTP request."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def stats(self) -> dict[str, Any]:
        with _answers(self.url, "its stats"):
            response = httpx.get(f"{self.url}/_mailbench/stats", timeout=self.timeout)
            response.raise_for_status()
            stats: dict[str, Any] = response.json()
            return stats

    def identity(self, timeout: float = 1.0) -> str | None:
        """The token the process answering at this URL was started with
        (:mod:`servers.identity`): ``""`` when it answers HTTP but gives none (a fake
        started by hand, or no fake at all), ``None`` when nothing answers HTTP yet."""
        try:
            response = httpx.get(f"{self.url}/_mailbench/stats", timeout=timeout)
        except httpx.HTTPError:
            return None
        try:
            stats = response.json()
        except ValueError:
            return ""
        return str(stats.get("identity") or "") if isinstance(stats, dict) else ""

    def ledger(self) -> list[Entry]:
        with _answers(self.url, "its ledger"):
            response = httpx.get(f"{self.url}/_mailbench/ledger", timeout=self.timeout)
            response.raise_for_status()
            entries: list[Entry] = response.json()["entries"]
            return entries

    async def ledger_async(self, client: httpx.AsyncClient) -> list[Entry]:
        with _answers(self.url, "its ledger"):
            response = await client.get(f"{self.url}/_mailbench/ledger", timeout=self.timeout)
            response.raise_for_status()
            entries: list[Entry] = response.json()["entries"]
            return entries

    def reset(self) -> None:
        """Clear the ledger, the counters and the rate limit's bucket."""
        with _answers(self.url, "a reset"):
            httpx.post(f"{self.url}/_mailbench/reset", timeout=self.timeout).raise_for_status()
