"""The fake Mailgun's server: settings, the send handler and its state.

The HTTP contract (answers, admin paths, the stats) is documented in
:mod:`servers.fakegun`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiohttp import web

from queues.errors import ConfigError
from servers.fakegun.faults import (
    CONNECTION_KINDS,
    MALFORMED,
    Fault,
    RateLimit,
    TokenBucket,
    abort_with_reset,
    check_faults,
    malformed_body,
    retry_after_header,
)
from servers.fakegun.latency import DEFAULT_LATENCY, parse_latency
from servers.fakegun.ledger import Ledger, LedgerEntry
from servers.fakegun.validate import (
    MAX_MESSAGE_BYTES,
    BadRequest,
    Fields,
    first,
    read_fields,
    validate,
)

# Longer than any sane client timeout, yet bounded so a forgotten fake still stops.
HANG_SECONDS = 120.0
JSON = "application/json"


@dataclass(frozen=True)
class FakegunSettings:
    """How the fake answers; ``mailbench fakegun``'s options map one to one."""

    host: str = "127.0.0.1"
    port: int = 0
    api_key: str = "key-mailbench"
    domains: tuple[str, ...] = ()  # empty: every domain is accepted
    latency: str = DEFAULT_LATENCY
    seed: int | None = None
    faults: tuple[Fault, ...] = ()
    rate_limit: RateLimit | None = None  # None: no limit
    idempotency: bool = False
    # The token it was started with (servers.identity), answered in its stats: how the
    # harness tells the fake it started from one already on the port.
    identity: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_faults(self.faults)


class FakeMailgun:
    """The fake API, owning its runner so a test can start it on port 0.

    ``clock`` is what the rate limit reads time from: the event loop's clock unless a
    test hands in its own to move time by hand.
    """

    def __init__(
        self,
        settings: FakegunSettings = FakegunSettings(),
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.settings = settings
        self.model = parse_latency(settings.latency, settings.seed)
        self._rng = self.model.rng  # faults share it, see servers.fakegun.latency
        self._expected_auth = (
            "Basic " + base64.b64encode(f"api:{settings.api_key}".encode()).decode()
        )
        self._domains = frozenset(settings.domains)
        self._faults = [(f.kind, f.probability) for f in settings.faults]
        self._idempotency = settings.idempotency
        self._id_prefix = os.urandom(4).hex()
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop  # set by start()
        self._clock = clock
        self._now: Callable[[], float]  # set by start(): clock, or the loop's
        self._url = ""
        self.port = 0  # known after start()
        self.in_flight = 0
        self.reset()

    # -- state -------------------------------------------------------------------------

    def reset(self) -> None:
        self._ledger = Ledger()
        self.received = 0
        self.replayed = 0
        self.testmode = 0
        self.rate_limited = 0
        self.by_status: Counter[str] = Counter()
        self.fault_counts: Counter[str] = Counter({kind: 0 for kind, _ in self._faults})
        self._key_counts: Counter[str] = Counter()
        self._first_answer: dict[str, bytes] = {}
        limit = self.settings.rate_limit
        self._bucket = TokenBucket(limit) if limit is not None else None
        self._sequence = 0
        self._stamp_second = -1
        self._stamp = ""

    @property
    def ledger(self) -> list[LedgerEntry]:
        """The accepted messages so far, oldest first (a copy)."""
        return self._ledger.entries()

    def stats(self) -> dict[str, Any]:
        delivered = len(self._ledger) - self.testmode
        keyed = sum(self._key_counts.values())
        return {
            "received": self.received,
            "accepted": len(self._ledger),
            "unique_keys": len(self._key_counts),
            "duplicates": keyed - len(self._key_counts),
            "in_flight": self.in_flight,
            "by_status": dict(self.by_status),
            "faults": dict(self.fault_counts),
            "latency": self.model.describe(),
            "delivered": delivered,
            "testmode": self.testmode,
            "replayed": self.replayed,
            "rate_limited": self.rate_limited,
        }

    # -- lifecycle ---------------------------------------------------------------------

    def create_app(self) -> web.Application:
        # A little above the 25 MB message limit so the limit is ours to report as 400.
        app = web.Application(client_max_size=MAX_MESSAGE_BYTES + 1024 * 1024)
        app.router.add_post("/v3/{domain}/messages", self._send)
        app.router.add_get("/_mailbench/ledger", self._get_ledger)
        app.router.add_get("/_mailbench/stats", self._get_stats)
        app.router.add_post("/_mailbench/reset", self._post_reset)
        return app

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._now = self._clock or self._loop.time
        self._stopping.clear()
        # No access log: one log line per request would cost more than the handler.
        self._runner = web.AppRunner(self.create_app(), access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.settings.host, self.settings.port, backlog=4096, reuse_address=True
        )
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise ConfigError(
                f"The fake Mailgun cannot listen on {self.settings.host}:{self.settings.port} "
                f"({exc.strerror}); choose another --host or --port."
            ) from exc
        host, port = self._runner.addresses[0][:2]
        self._url = f"http://{host}:{port}"
        self.port = int(port)  # the one bound, also when the settings asked for 0

    @property
    def url(self) -> str:
        if not self._url:
            raise RuntimeError("FakeMailgun.url is known only after start()")
        return self._url

    async def stop(self) -> None:
        self._stopping.set()  # releases hung requests at once
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeMailgun:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- handlers ----------------------------------------------------------------------

    async def _send(self, request: web.Request) -> web.StreamResponse:
        deadline = self._loop.time() + self.model.sample()
        received_at = time.time()
        self.received += 1
        self.in_flight += 1
        try:
            response = await self._answer(request, received_at, deadline)
            if response is None:  # a connection fault: the client never sees a status
                return web.Response()
            self.by_status[str(response.status)] += 1
            return response
        finally:
            self.in_flight -= 1

    def _draw_fault(self) -> str | None:
        if not self._faults:
            return None
        draw = self._rng.random()
        for kind, probability in self._faults:
            if draw < probability:
                return kind
            draw -= probability
        return None

    async def _answer(
        self, request: web.Request, received_at: float, deadline: float
    ) -> web.Response | None:
        auth = request.headers.get("Authorization")
        if auth != self._expected_auth and not self._auth_ok(auth):
            await asyncio.sleep(deadline - self._loop.time())
            return web.Response(status=401, text="Forbidden")
        domain = request.match_info["domain"]
        if self._domains and domain not in self._domains:
            await asyncio.sleep(deadline - self._loop.time())
            return _json(404, {"message": f"Domain not found: {domain}"})
        # Drawn before the rate limit decides, so that which sends draw does not depend
        # on timing: with a seed, the n-th send always draws the same fault.
        fault = self._draw_fault()
        if self._bucket is not None:
            wait = self._bucket.take(self._now())
            if wait > 0.0:
                return self._too_many_requests(wait)
        if fault is not None and fault != MALFORMED:
            self.fault_counts[fault] += 1
            return await self._inject(request, fault, deadline)
        fields, size = await read_fields(request)
        try:
            recipients = validate(fields, size)
        except BadRequest as exc:
            await asyncio.sleep(deadline - self._loop.time())
            return _json(400, {"message": str(exc)})
        key = request.headers.get("Idempotency-Key") or first(fields, "v:idempotency_key")
        await asyncio.sleep(deadline - self._loop.time())
        # Decided only now, at acceptance: a duplicate that arrived while the first copy
        # was still being "sent" is still recognised if the first one was accepted first.
        if key is not None and self._idempotency and key in self._first_answer:
            self.replayed += 1
            body = self._first_answer[key]
        else:
            body = self._accept(domain, key, recipients, fields, received_at)
        if fault is not None:  # malformed: accepted all the same, the answer unreadable
            self.fault_counts[fault] += 1
            body = malformed_body(body, self.fault_counts[fault])
        return web.Response(body=body, content_type=JSON)

    def _accept(
        self,
        domain: str,
        key: str | None,
        recipients: list[str],
        fields: Fields,
        received_at: float,
    ) -> bytes:
        """Put the message in the ledger; return the body of Mailgun's answer."""
        message_id = self._message_id(domain)
        body = b'{"id": %s, "message": "Queued. Thank you."}' % json.dumps(message_id).encode()
        testmode = (first(fields, "o:testmode") or "").lower() in {"yes", "true"}
        subject = first(fields, "subject") or ""
        accepted_at = time.time()
        self._ledger.append(
            message_id, key, domain, recipients, subject, received_at, accepted_at, testmode
        )
        if testmode:
            self.testmode += 1
        elif key is not None:
            self._key_counts[key] += 1
            if self._idempotency:
                self._first_answer[key] = body
        return body

    def _too_many_requests(self, wait: float) -> web.Response:
        self.rate_limited += 1
        response = _json(429, {"message": "Too many requests; please retry later"})
        response.headers["Retry-After"] = retry_after_header(wait)
        return response

    def _auth_ok(self, header: str | None) -> bool:
        # The slow path, for encodings other than the exact header most clients send
        # (a lower-case scheme, extra spaces).
        scheme, _, encoded = (header or "").strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return False
        return decoded == f"api:{self.settings.api_key}"

    async def _inject(
        self, request: web.Request, fault: str, deadline: float
    ) -> web.Response | None:
        if fault == "hang":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), HANG_SECONDS)
        else:
            await asyncio.sleep(deadline - self._loop.time())
        if fault in CONNECTION_KINDS:
            abort_with_reset(request)
            return None
        response = _json(int(fault), {"message": f"Injected fault {fault}"})
        if fault == "429":
            response.headers["Retry-After"] = "1"
        return response

    def _message_id(self, domain: str) -> str:
        now = int(time.time())
        if now != self._stamp_second:  # strftime once a second, not once a message
            self._stamp_second = now
            self._stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now))
        self._sequence += 1
        return f"<{self._stamp}.{self._id_prefix}{self._sequence:08x}@{domain}>"

    async def _get_ledger(self, request: web.Request) -> web.Response:
        return _json(200, {"entries": [entry.as_json() for entry in self._ledger.entries()]})

    async def _get_stats(self, request: web.Request) -> web.Response:
        return _json(200, {**self.stats(), "identity": self.settings.identity})

    async def _post_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return _json(200, {"ok": True})


def _json(status: int, payload: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=json.dumps(payload).encode(), content_type=JSON)
