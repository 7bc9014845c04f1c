"""The fake Mailgun's faults and rate limit: what a client of the real API must survive.

Faults (``--fault KIND:PROB``, repeatable) are drawn once per authenticated send from the
latency model's seeded generator (``model.rng``, see :mod:`servers.fakegun.latency`), so a run
with ``--seed`` repeats: the n-th send gets the same latency and the same fault whatever
the timing. At most one fault hits a send; their probabilities may add up to 1.

* ``STATUS:PROB`` — after the drawn latency, answer that 4xx/5xx status with Mailgun's
  JSON error body and deliver nothing (``429`` also says ``Retry-After: 1``);
* ``reset:PROB`` — after the latency, drop the connection with a TCP RST;
* ``hang:PROB`` — never answer, so the client's timeout fires (a stopping fake lets go);
* ``malformed:PROB`` — the message *is* accepted and delivered, but the 200 carries a
  body that is not JSON (in turn, truncated JSON and a proxy's HTML error page, both
  labelled ``application/json``). The client cannot tell whether it was sent: this is
  the unknown outcome that turns into a duplicate unless the API honours idempotency keys.

The rate limit (``--rate-limit RATE[:BURST]``) is a token bucket: RATE tokens a second,
at most BURST (default RATE: one second's worth) saved up. A send that finds the bucket
empty gets 429 at once, with ``Retry-After`` in whole seconds (at least 1) until a token
will be there, as a rate limiter in front of an API answers before doing any work.
"""

from __future__ import annotations

import contextlib
import math
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web

from queues.errors import ConfigError

MALFORMED = "malformed"
CONNECTION_KINDS = frozenset({"reset", "hang"})  # the client never sees a status
_KINDS = CONNECTION_KINDS | {MALFORMED}
_HTML_ERROR = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n</body>\r\n</html>\r\n"
)


@dataclass(frozen=True, slots=True)
class Fault:
    """Inject ``kind`` (an HTTP status such as ``"503"``, ``reset``, ``hang`` or
    ``malformed``) into a send with this probability."""

    kind: str
    probability: float

    def __str__(self) -> str:
        return f"{self.kind}:{self.probability!r}"


def parse_fault(text: str) -> Fault:
    """Read ``STATUS:PROB``, ``reset:PROB``, ``hang:PROB`` or ``malformed:PROB``."""
    kind, _, prob = text.strip().partition(":")
    kind = kind.strip().lower()
    try:
        probability = float(prob)
    except ValueError:
        probability = math.nan
    valid_kind = kind in _KINDS or (kind.isdigit() and 400 <= int(kind) <= 599)
    if not valid_kind or not 0.0 <= probability <= 1.0:
        raise ConfigError(
            f"Fault {text!r} is not understood: use STATUS:PROB (a 4xx/5xx status such as "
            "503:0.01 or 429:0.02), reset:PROB, hang:PROB or malformed:PROB, with PROB "
            "between 0 and 1."
        )
    return Fault(kind, probability)


def check_faults(faults: Sequence[Fault]) -> None:
    """Refuse a fault given twice or probabilities that add up to more than 1."""
    kinds = [fault.kind for fault in faults]
    repeated = sorted({kind for kind in kinds if kinds.count(kind) > 1})
    if repeated:
        raise ConfigError(
            f"Fault {', '.join(repeated)} is given more than once; give each kind once "
            "with its total probability."
        )
    total = math.fsum(fault.probability for fault in faults)
    if total > 1.0:
        listed = " + ".join(str(fault) for fault in faults)
        raise ConfigError(
            f"The fault probabilities add up to {total:g} ({listed}); at most one fault "
            "hits a send, so they may add up to 1 at most."
        )


@dataclass(frozen=True, slots=True)
class RateLimit:
    """``rate`` sends a second on average, ``burst`` of them at once after a quiet spell."""

    rate: float
    burst: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise ConfigError(f"A rate limit must be above 0 sends a second, not {self.rate}.")
        if not (math.isfinite(self.burst) and self.burst >= 1):
            raise ConfigError(
                f"A rate limit's burst must be at least 1 send, not {self.burst}: "
                "with less, no send would ever pass."
            )

    def __str__(self) -> str:
        return f"{self.rate:g}:{self.burst:g}"


def parse_rate_limit(text: str) -> RateLimit:
    """Read ``RATE[:BURST]``; BURST defaults to RATE, one second's worth of sends."""
    rate_text, colon, burst_text = text.strip().partition(":")
    try:
        rate = float(rate_text)
        burst = float(burst_text) if colon else rate
        return RateLimit(rate, burst)
    except (ValueError, ConfigError) as exc:
        raise ConfigError(
            f"Rate limit {text!r} is not understood: use RATE[:BURST] with RATE the sends a "
            "second (above 0) and BURST how many may come at once (at least 1, default "
            "RATE), e.g. 300 or 300:50."
        ) from exc


class TokenBucket:
    """``take(now)`` spends a token, or tells how long until one is there.

    Time is handed in, never read here: the fake passes its event loop's clock, and a
    test can move time forward without sleeping. The bucket starts full.
    """

    __slots__ = ("_burst", "_rate", "_tokens", "_updated")

    def __init__(self, limit: RateLimit) -> None:
        self._rate = limit.rate
        self._burst = limit.burst
        self._tokens = limit.burst
        self._updated: float | None = None

    def take(self, now: float) -> float:
        """0.0 if a token was taken; else the seconds until the next token (none taken)."""
        if self._updated is None or now < self._updated:  # first use, or a clock step back
            self._updated = now
        elif now > self._updated:
            refill = (now - self._updated) * self._rate
            self._tokens = min(self._burst, self._tokens + refill)
            self._updated = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self._rate


def retry_after_header(wait: float) -> str:
    """``Retry-After`` in whole seconds, rounded up and at least 1 (0 invites a stampede)."""
    return str(max(1, math.ceil(wait)))


def malformed_body(body: bytes, count: int) -> bytes:
    """The ``count``-th malformed answer: odd ones cut mid-JSON, even ones an HTML page."""
    return body[: len(body) // 2] if count % 2 else _HTML_ERROR


def abort_with_reset(request: web.Request) -> None:
    """Drop the connection so the client reads "connection reset by peer"."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # Linger 0 turns the close into a TCP RST.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
