"""A Mailgun API client for the reference server and the queue workers.

Both flavours share one request shape and one classification of outcomes:

* ``success`` — the API accepted the message (a 2xx with Mailgun's JSON answer);
* ``retryable`` — try again later: 429 (honour ``Retry-After``, an hour at most), 408,
  5xx, connection errors, timeouts, and a 2xx whose body is not a JSON object. A timeout
  after the request was sent, or a "success" the client cannot read, has an unknown
  outcome: the message may have been sent, so the retry must carry the *same* idempotency
  key (only an API that honours it keeps that retry from delivering twice);
* ``permanent`` — any other 4xx: retrying cannot help, the job goes to the dead letter.

Timeouts are always set: Mailgun is observed to hang for tens of seconds under load.

A send is ``application/x-www-form-urlencoded`` (the cheap common case) unless it carries
inline attachments, which go as ``multipart/form-data`` ``inline`` file parts.
"""

from __future__ import annotations

import argparse
import email.utils
import enum
import logging
import math
import mimetypes
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from queues.base import Email

log = logging.getLogger(__name__)

# The longest wait a Retry-After can ask for. Longer values are taken as this (and
# logged): a job should not sit out days for one answer of the API, and every queue must
# be able to hold the wait (RabbitMQ's wait queues end at 10,000 s).
MAX_RETRY_AFTER = 3600.0
IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_VARIABLE = "v:idempotency_key"

Inline = Sequence[tuple[str, bytes]]
"""Inline attachments: ``(filename, data)`` pairs, referenced from HTML as ``cid:filename``."""
FileParts = list[tuple[str, tuple[str, bytes, str]]]


class Outcome(enum.Enum):
    SUCCESS = "success"
    RETRYABLE = "retryable"
    PERMANENT = "permanent"


@dataclass(frozen=True, slots=True)
class SendResult:
    outcome: Outcome
    status: int | None
    message_id: str | None = None
    retry_after: float | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.SUCCESS

    @property
    def metric(self) -> str:
        """The histogram this call's time goes to: ``api`` holds the calls the API
        accepted, the cost of a send; an instant 429, a 5xx (or a timeout, a connection
        error, a malformed answer) and a refusal each have their own."""
        if self.ok:
            return "api"
        if self.status == 429:
            return "api_rate_limited"
        if self.outcome is Outcome.RETRYABLE:
            return "api_retryable"
        return "api_failed"


@dataclass(frozen=True, slots=True)
class MailgunSettings:
    base_url: str = "https://api.mailgun.net"
    api_key: str = field(default="key-mailbench", repr=False)
    domain: str = "mailbench.test"
    connect_timeout: float = 2.0
    timeout: float = 10.0
    max_connections: int = 1000

    @property
    def messages_url(self) -> str:
        return f"{self.base_url.rstrip('/')}/v3/{self.domain}/messages"

    def timeouts(self) -> httpx.Timeout:
        return httpx.Timeout(self.timeout, connect=self.connect_timeout)


def add_mailgun_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every caller of the API takes (the server and the worker)."""
    parser.add_argument(
        "--mailgun-url",
        default="http://127.0.0.1:8025",
        help="base URL of the Mailgun API (default: a local fakegun)",
    )
    parser.add_argument(
        "--mailgun-key",
        default=os.environ.get("MAILGUN_API_KEY", "key-mailbench"),
        help="API key (default: $MAILGUN_API_KEY; on a command line, ps shows it to everyone)",
    )
    parser.add_argument("--mailgun-domain", default="mailbench.test")


def mailgun_settings_from_args(args: argparse.Namespace) -> MailgunSettings:
    return MailgunSettings(
        base_url=args.mailgun_url, api_key=args.mailgun_key, domain=args.mailgun_domain
    )


def message_form(email: Email, idempotency_key: str) -> dict[str, str]:
    return {
        "from": email.sender,
        "to": email.to,
        "subject": email.subject,
        "text": email.text,
        IDEMPOTENCY_VARIABLE: idempotency_key,
    }


def inline_parts(inline: Inline) -> FileParts:
    """httpx ``files=`` for inline attachments, typed by their filename's extension."""
    parts: FileParts = []
    for filename, data in inline:
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        parts.append(("inline", (filename, data, content_type)))
    return parts


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds from now: either delta-seconds or an HTTP date, at most
    :data:`MAX_RETRY_AFTER`; None when it is absent or cannot be read."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return None
    if not math.isfinite(seconds):
        return None
    if seconds > MAX_RETRY_AFTER:
        log.warning(
            "the API's Retry-After %r is beyond the most mailbench waits: waiting %g s",
            value,
            MAX_RETRY_AFTER,
        )
        return MAX_RETRY_AFTER
    return max(0.0, seconds)


def classify(response: httpx.Response) -> SendResult:
    status = response.status_code
    if 200 <= status < 300:
        try:
            body: Any = response.json()
        except ValueError:  # also UnicodeDecodeError
            body = None
        if not isinstance(body, dict):
            # Truncated JSON, a proxy's HTML page: the API may well have taken the message.
            return SendResult(Outcome.RETRYABLE, status, detail=_malformed_detail(response))
        message_id = body.get("id")
        return SendResult(
            Outcome.SUCCESS, status, message_id=message_id if isinstance(message_id, str) else None
        )
    detail = _error_detail(response)
    if status == 429 or status >= 500 or status == 408:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return SendResult(Outcome.RETRYABLE, status, retry_after=retry_after, detail=detail)
    return SendResult(Outcome.PERMANENT, status, detail=detail)


def classify_error(exc: httpx.HTTPError) -> SendResult:
    cause = exc.__cause__
    if isinstance(cause, aiohttp.ClientError) and not isinstance(cause, TimeoutError):
        # httpx-aiohttp reports every aiohttp connection error as ConnectTimeout, a
        # connection reset by the peer included: name what really happened.
        return SendResult(Outcome.RETRYABLE, None, detail=f"connection error: {cause!r}")
    if isinstance(exc, httpx.TimeoutException):
        # The request may have reached the API: only the same idempotency key makes a
        # retry safe.
        return SendResult(Outcome.RETRYABLE, None, detail=f"timeout ({type(exc).__name__})")
    if isinstance(exc, httpx.TransportError):
        return SendResult(Outcome.RETRYABLE, None, detail=f"connection error: {exc!r}")
    if isinstance(exc, httpx.DecodingError):
        # The body broke after the request was sent: the outcome is unknown.
        return SendResult(Outcome.RETRYABLE, None, detail=f"undecodable response: {exc!r}")
    return SendResult(Outcome.PERMANENT, None, detail=f"client error: {exc!r}")


def _malformed_detail(response: httpx.Response) -> str:
    excerpt = response.content[:80].decode("utf-8", "replace")
    return f"malformed response: {response.status_code} with body {excerpt!r}"


def _error_detail(response: httpx.Response) -> str:
    try:
        body: Any = response.json()
        if isinstance(body, dict) and "message" in body:
            return f"{response.status_code}: {body['message']}"
    except ValueError:
        pass
    return f"{response.status_code}: {response.text[:200]}"


class MailgunClient:
    """Async client with pooled connections; one per process.

    The httpx API over an aiohttp transport: httpx's own async pool collapses under a few
    hundred concurrent requests (encode/httpx#3215; measured here: 23 requests/s with 200
    in flight at 0.75 s latency, against 198/s through aiohttp), which would make a worker
    measure its HTTP client instead of its queue.
    """

    def __init__(
        self, settings: MailgunSettings, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.settings = settings
        limits = httpx.Limits(
            max_connections=settings.max_connections,
            max_keepalive_connections=settings.max_connections,
        )
        self._http = httpx.AsyncClient(
            auth=("api", settings.api_key),
            timeout=settings.timeouts(),
            limits=limits,
            transport=transport or AiohttpTransport(limits=limits),
        )

    async def send(self, email: Email, idempotency_key: str, *, inline: Inline = ()) -> SendResult:
        """Send once; never raises for HTTP or network trouble (see :class:`Outcome`)."""
        try:
            response = await self._http.post(
                self.settings.messages_url,
                data=message_form(email, idempotency_key),
                files=inline_parts(inline) if inline else None,
                headers={IDEMPOTENCY_HEADER: idempotency_key},
            )
        except httpx.HTTPError as exc:
            return classify_error(exc)
        return classify(response)

    async def aclose(self) -> None:
        await self._http.aclose()


class BlockingMailgunClient:
    """Sync client (httpx). The ``blocking`` server mode calls it inside an async handler
    on purpose: it shows what one blocking call does to every other request."""

    def __init__(
        self, settings: MailgunSettings, transport: httpx.BaseTransport | None = None
    ) -> None:
        self.settings = settings
        self._http = httpx.Client(
            auth=("api", settings.api_key), timeout=settings.timeouts(), transport=transport
        )

    def send(self, email: Email, idempotency_key: str, *, inline: Inline = ()) -> SendResult:
        """Send once; never raises for HTTP or network trouble (see :class:`Outcome`)."""
        try:
            response = self._http.post(
                self.settings.messages_url,
                data=message_form(email, idempotency_key),
                files=inline_parts(inline) if inline else None,
                headers={IDEMPOTENCY_HEADER: idempotency_key},
            )
        except httpx.HTTPError as exc:
            return classify_error(exc)
        return classify(response)

    def close(self) -> None:
        self._http.close()
