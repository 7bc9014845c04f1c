"""A fake Mailgun HTTP API: the send endpoint, a latency model, faults and a ledger.

``POST /v3/{domain}/messages`` answers as Mailgun does (401 plain ``Forbidden``, 404 for
an unknown domain, 400 JSON ``{"message": ...}``, 200 ``Queued. Thank you.``), after the
latency the model draws. The wait is measured from the request's arrival, so the time
spent parsing the body is absorbed and the achieved latency matches the model.

Every accepted message goes into the ledger, the ground truth the harness counts
deliveries, duplicates and loss against. Admin paths, without auth (a contract the
harness relies on):

* ``GET /_mailbench/ledger`` → ``{"entries": [LedgerEntry.as_json(), ...]}``
* ``GET /_mailbench/stats`` → ``{"received", "accepted", "unique_keys", "duplicates",
  "in_flight", "by_status": {"200": n, ...}, "faults": {"503": n, ...}, "latency": spec,
  "delivered", "testmode", "replayed"}``
* ``POST /_mailbench/reset`` → ``{"ok": true}``; clears the ledger and the counters.

``received`` counts every send request, ``accepted`` every ledger entry (test mode ones
too), ``delivered`` the entries not in test mode. ``unique_keys`` and ``duplicates``
(extra deliveries of a key) are over delivered entries that carry an idempotency key.
``replayed`` counts the answers ``dedupe`` mode repeated instead of delivering again.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import json
import logging
import os
import re
import signal
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import getaddresses
from types import TracebackType
from typing import Any, NamedTuple

from aiohttp import web
from yarl import query_to_pairs

from harness.errors import ConfigError, MailbenchError
from servers.latency import DEFAULT_LATENCY, parse_latency

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 25 * 1024 * 1024
MAX_RECIPIENTS = 1000
MAX_VARIABLES_BYTES = 16 * 1024
# Longer than any sane client timeout, yet bounded so a forgotten fake still stops.
HANG_SECONDS = 120.0
JSON = "application/json"
_ADDRESS = re.compile(r"[^@\s<>,;\"]+@[^@\s<>,;\"]+\.[^@\s<>,;\"]+")
_ANGLE = re.compile(r"<([^<>]*)>\s*$")
_VARIABLE_PREFIXES = frozenset({"o:", "h:", "v:", "t:"})
_NONE: list[str] = []  # a shared default for absent fields; never mutated
_CONNECTION_FAULTS = frozenset({"reset", "hang"})
Fields = dict[str, list[str]]


@dataclass(frozen=True, slots=True)
class Fault:
    """Inject ``kind`` (an HTTP status such as ``"503"``, ``"reset"`` or ``"hang"``)."""

    kind: str
    probability: float

    def __str__(self) -> str:
        return f"{self.kind}:{self.probability!r}"


def parse_fault(text: str) -> Fault:
    """Read ``STATUS:PROB``, ``reset:PROB`` or ``hang:PROB`` (PROB between 0 and 1)."""
    kind, _, prob = text.strip().partition(":")
    kind = kind.strip().lower()
    try:
        probability = float(prob)
    except ValueError:
        probability = -1.0
    valid_kind = kind in {"reset", "hang"} or (kind.isdigit() and 400 <= int(kind) <= 599)
    if not valid_kind or not 0.0 <= probability <= 1.0:
        raise ConfigError(
            f"Fault {text!r} is not understood: use STATUS:PROB (a 4xx/5xx status such as "
            "503:0.01 or 429:0.02), reset:PROB or hang:PROB, with PROB between 0 and 1."
        )
    return Fault(kind, probability)


@dataclass(frozen=True)
class FakegunSettings:
    host: str = "127.0.0.1"
    port: int = 0
    api_key: str = "key-mailbench"
    domains: tuple[str, ...] = ()  # empty: every domain is accepted
    latency: str = DEFAULT_LATENCY
    seed: int | None = None
    faults: tuple[Fault, ...] = ()
    dedupe: bool = False


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
    an object per message would (see :func:`cli_main` on why that matters here).
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


class _BadRequest(Exception):
    """A send Mailgun would refuse with 400 and this message."""


def _addresses(field: str, values: list[str]) -> list[str]:
    found: list[str] = []
    for value in values:
        if '"' in value:
            # A quoted display name may hide commas: the standard parser handles it,
            # at ~30 µs a call too slow to be the common path.
            parts = [address for _, address in getaddresses([value])]
        else:
            parts = value.split(",")
        for part in parts:
            address = part.strip()
            if "<" in address:  # Name <user@domain>
                match = _ANGLE.search(address)
                address = match.group(1).strip() if match else ""
            if not address:
                continue
            if _ADDRESS.fullmatch(address) is None:
                raise _BadRequest(
                    f"'{field}' parameter is not a valid address. please check documentation"
                )
            found.append(address)
    return found


def _validate(fields: Fields) -> list[str]:
    """Check a send as Mailgun does; return all recipients (to, cc, bcc)."""
    get = fields.get
    if not _addresses("from", get("from", _NONE)):
        raise _BadRequest("'from' parameter is missing")
    recipients = _addresses("to", get("to", _NONE))
    if not recipients:
        raise _BadRequest("'to' parameter is missing")
    if "cc" in fields or "bcc" in fields:
        recipients += _addresses("cc", get("cc", _NONE)) + _addresses("bcc", get("bcc", _NONE))
    if len(recipients) > MAX_RECIPIENTS:
        raise _BadRequest(
            f"Too many recipients: {len(recipients)}, the maximum is {MAX_RECIPIENTS}"
        )
    if not (any(get("text", _NONE)) or any(get("html", _NONE)) or any(get("template", _NONE))):
        raise _BadRequest("Need at least one of 'text', 'html' or 'template' parameters specified")
    variables = 0
    for key, values in fields.items():
        if key[:2] in _VARIABLE_PREFIXES:
            variables += len(key) + sum(map(len, values))
    if variables > MAX_VARIABLES_BYTES:
        raise _BadRequest("Total size of 'o:', 'h:', 'v:' and 't:' parameters exceeds 16KB")
    return recipients


async def _read_fields(request: web.BaseRequest) -> tuple[Fields, int]:
    """The text fields of a send, and its size with attachments."""
    fields: Fields = {}
    # The raw header, not request.content_type, which parses it on every request.
    content_type = request.headers.get("Content-Type", "")
    if content_type.startswith("application/x-www-form-urlencoded"):
        # Not request.post(): on this hot path its MultiDict is the costly part.
        body = await request.read()
        for key, value in query_to_pairs(body.decode("utf-8", "replace")):
            fields.setdefault(key, []).append(value)
        return fields, len(body)
    size = 0
    for key, item in (await request.post()).items():
        if isinstance(item, web.FileField):  # an attachment: only its size matters
            size += item.file.seek(0, os.SEEK_END)
            item.file.close()
            continue
        text = item if isinstance(item, str) else bytes(item).decode("utf-8", "replace")
        size += len(text)
        fields.setdefault(key, []).append(text)
    return fields, size


class FakeMailgun:
    """The fake API, owning its runner so a test can start it on port 0."""

    def __init__(self, settings: FakegunSettings = FakegunSettings()) -> None:
        self.settings = settings
        self.model = parse_latency(settings.latency, settings.seed)
        self._rng = self.model.rng  # faults share it, see servers.latency
        self._expected_auth = (
            "Basic " + base64.b64encode(f"api:{settings.api_key}".encode()).decode()
        )
        self._domains = frozenset(settings.domains)
        self._faults = [(f.kind, f.probability) for f in settings.faults]
        if sum(p for _, p in self._faults) > 1.0:
            raise ConfigError("The fault probabilities add up to more than 1.")
        self._id_prefix = os.urandom(4).hex()
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop  # set by start()
        self._url = ""
        self.in_flight = 0
        self.reset()

    # -- state -------------------------------------------------------------------------

    def reset(self) -> None:
        self._ledger = Ledger()
        self.received = 0
        self.replayed = 0
        self.testmode = 0
        self.by_status: Counter[str] = Counter()
        self.fault_counts: Counter[str] = Counter({kind: 0 for kind, _ in self._faults})
        self._key_counts: Counter[str] = Counter()
        self._first_answer: dict[str, bytes] = {}
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
                self.fault_counts[kind] += 1
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
        fault = self._draw_fault()
        if fault is not None:
            return await self._inject(request, fault, deadline)
        fields, size = await _read_fields(request)
        try:
            if size > MAX_MESSAGE_BYTES:
                raise _BadRequest("Message size exceeds the 25MB limit")
            recipients = _validate(fields)
        except _BadRequest as exc:
            await asyncio.sleep(deadline - self._loop.time())
            return _json(400, {"message": str(exc)})
        key = request.headers.get("Idempotency-Key") or _first(fields, "v:idempotency_key")
        testmode = (_first(fields, "o:testmode") or "").lower() in {"yes", "true"}
        await asyncio.sleep(deadline - self._loop.time())
        # Decided only now, at acceptance: a duplicate that arrived while the first copy
        # was still being "sent" is still recognised if the first one was accepted first.
        if key is not None and self.settings.dedupe and key in self._first_answer:
            self.replayed += 1
            return web.Response(body=self._first_answer[key], content_type=JSON)
        message_id = self._message_id(domain)
        body = b'{"id": %s, "message": "Queued. Thank you."}' % json.dumps(message_id).encode()
        self._ledger.append(
            message_id,
            key,
            domain,
            recipients,
            _first(fields, "subject") or "",
            received_at,
            time.time(),
            testmode,
        )
        if testmode:
            self.testmode += 1
        elif key is not None:
            self._key_counts[key] += 1
            if self.settings.dedupe:
                self._first_answer[key] = body
        return web.Response(body=body, content_type=JSON)

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
        if fault in _CONNECTION_FAULTS:
            transport = request.transport
            if transport is not None:
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    # Linger 0 turns the close into a TCP RST: "connection reset by peer".
                    with contextlib.suppress(OSError):
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                transport.abort()
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
        return _json(200, self.stats())

    async def _post_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return _json(200, {"ok": True})


def _first(fields: Fields, name: str) -> str | None:
    values = fields.get(name)
    return values[0] if values else None


def _json(status: int, payload: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=json.dumps(payload).encode(), content_type=JSON)


# -- command line -------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to bind")
    add("--port", type=int, default=8025, help="port to bind (0: any free port)")
    add(
        "--api-key",
        default=os.environ.get("MAILGUN_API_KEY", FakegunSettings.api_key),
        help="the API key clients must send (default: $MAILGUN_API_KEY; ps shows command lines)",
    )
    add("--domain", action="append", default=[], help="accepted domain, repeatable (default any)")
    add("--latency", default=DEFAULT_LATENCY, help=f"latency spec (default {DEFAULT_LATENCY})")
    add("--seed", type=int, default=None, help="seed for the latency and fault draws")
    add(
        "--fault",
        action="append",
        default=[],
        metavar="KIND:PROB",
        help="inject STATUS:PROB (e.g. 503:0.01, 429:0.02), reset:PROB or hang:PROB; repeatable",
    )
    add("--dedupe", action="store_true", help="answer a repeated idempotency key as the first")


def settings_from_args(args: argparse.Namespace) -> FakegunSettings:
    return FakegunSettings(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        domains=tuple(args.domain),
        latency=args.latency,
        seed=args.seed,
        faults=tuple(parse_fault(text) for text in args.fault),
        dedupe=args.dedupe,
    )


async def _serve(settings: FakegunSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with FakeMailgun(settings) as fake:
        print(f"fakegun listening on {fake.url} (latency {fake.model.describe()})", flush=True)
        await stop.wait()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    # uvloop, when installed, cuts the fake's CPU per request by a fifth and keeps the
    # achieved latency closer to the model at thousands of sends a second.
    try:
        import uvloop
    except ImportError:
        logger.info("uvloop is not installed: the fake runs on the asyncio event loop")
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _tune_garbage_collection() -> None:
    # At 1,500 sends in flight each holds ~100 container objects for its 0.5-1 s of
    # latency, so the default thresholds promote them all and scan them over and over:
    # measured, ~15% of the fake's CPU and pauses of 20-170 ms, which clients would see
    # as latency the model never drew. The fake makes next to no reference cycles and
    # keeps its ledger in untracked objects, so collect only once a million tracked
    # objects have piled up; freezing first leaves the imported modules out of it.
    gc.freeze()
    gc.set_threshold(1_000_000)


def cli_main(args: argparse.Namespace) -> int:
    """Run the fake until SIGINT or SIGTERM; raise ConfigError on bad options."""
    settings = settings_from_args(args)
    _tune_garbage_collection()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve(settings))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m servers.fakegun``: the same server without the mailbench front end."""
    parser = argparse.ArgumentParser(prog="python -m servers.fakegun")
    add_cli_arguments(parser)
    try:
        return cli_main(parser.parse_args(argv))
    except MailbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
