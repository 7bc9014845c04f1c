"""The Mailgun client: request shape and outcome classification, async and blocking."""

from __future__ import annotations

import base64
import email.utils
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import HTTP
from typing import Protocol
from urllib.parse import parse_qs

import aiohttp
import httpx
import pytest
import pytest_asyncio
import respx

from queues.base import Email
from servers.mailgun import (
    BlockingMailgunClient,
    Inline,
    MailgunClient,
    MailgunSettings,
    Outcome,
    SendResult,
    classify_error,
)

SETTINGS = MailgunSettings(
    base_url="http://mailgun.test/", api_key="key-secret", connect_timeout=1.5, timeout=7.0
)
MESSAGES_URL = "http://mailgun.test/v3/mailbench.test/messages"
EMAIL = Email(to="ada@example.com", subject="Hello & welcome", text="Line one\nline two")
KEY = "5f0c9d2e"

# The smallest valid PNG: 1x1, one transparent pixel.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000b49444154789c6360000200000500017a5eab3f0000000049454e44ae426082"
)


class Send(Protocol):
    async def __call__(self, email: Email, key: str, /, *, inline: Inline = ()) -> SendResult: ...


@pytest.fixture
def api() -> Iterator[respx.MockRouter]:
    with respx.mock(using="httpx", assert_all_mocked=True) as router:
        yield router


# One client of each kind for the whole module: building one costs ~80 ms (TLS setup).
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def async_client() -> AsyncIterator[MailgunClient]:
    client = MailgunClient(SETTINGS)
    yield client
    await client.aclose()


@pytest.fixture(scope="module")
def blocking_client() -> Iterator[BlockingMailgunClient]:
    client = BlockingMailgunClient(SETTINGS)
    yield client
    client.close()


@pytest.fixture(params=["async", "blocking"])
def send(
    request: pytest.FixtureRequest,
    async_client: MailgunClient,
    blocking_client: BlockingMailgunClient,
) -> Send:
    """The same call through either client, so every case checks both classifications."""
    if request.param == "async":
        return async_client.send

    async def send_blocking(email: Email, key: str, *, inline: Inline = ()) -> SendResult:
        return blocking_client.send(email, key, inline=inline)

    return send_blocking


async def test_accepted_message_is_a_success_with_its_id(api: respx.MockRouter, send: Send) -> None:
    api.post(MESSAGES_URL).respond(
        200, json={"id": "<20240101.1@mailbench.test>", "message": "Queued. Thank you."}
    )
    result = await send(EMAIL, KEY)
    assert result == SendResult(Outcome.SUCCESS, 200, message_id="<20240101.1@mailbench.test>")
    assert result.ok


async def test_success_without_an_id_still_counts(api: respx.MockRouter, send: Send) -> None:
    api.post(MESSAGES_URL).respond(200, json={"message": "Queued. Thank you."})
    result = await send(EMAIL, KEY)
    assert result.outcome is Outcome.SUCCESS and result.message_id is None


@pytest.mark.parametrize(
    ("status", "body", "excerpt"),
    [
        (200, b'{"id": "<20240101.1@mailbench.test>", "mess', '{"id": "<2024'),
        (200, b"<html><body><h1>Service Unavailable</h1></body></html>", "<html><body>"),
        (200, b"", "''"),
        (200, b"ok", "'ok'"),
        (200, b'["queued"]', "queued"),
        (200, b"\xff\xfe not utf-8", "not utf-8"),
        (202, b"null", "null"),
    ],
)
async def test_a_2xx_that_cannot_be_read_is_retryable(
    api: respx.MockRouter, send: Send, status: int, body: bytes, excerpt: str
) -> None:
    # The message may have been accepted: only a retry with the same key settles it.
    headers = {"Content-Type": "application/json"}
    api.post(MESSAGES_URL).respond(status, content=body, headers=headers)
    result = await send(EMAIL, KEY)
    assert result.outcome is Outcome.RETRYABLE and not result.ok
    assert (result.status, result.message_id, result.retry_after) == (status, None, None)
    assert result.detail.startswith(f"malformed response: {status} with body ")
    assert excerpt in result.detail


@pytest.mark.parametrize(
    ("status", "body", "detail"),
    [
        (
            400,
            {"json": {"message": "'to' parameter is not a valid address"}},
            "400: 'to' parameter is not a valid address",
        ),
        (401, {"text": "Forbidden"}, "401: Forbidden"),
        (403, {"text": "Forbidden"}, "403: Forbidden"),
        (
            404,
            {"json": {"message": "Domain not found: nope.test"}},
            "404: Domain not found: nope.test",
        ),
        (413, {"text": "too large"}, "413: too large"),
    ],
)
async def test_client_errors_are_permanent_with_the_detail(
    api: respx.MockRouter, send: Send, status: int, body: dict[str, object], detail: str
) -> None:
    api.post(MESSAGES_URL).respond(status, **body)  # type: ignore[arg-type]
    result = await send(EMAIL, KEY)
    assert result == SendResult(Outcome.PERMANENT, status, detail=detail)
    assert not result.ok


async def test_429_with_retry_after_seconds(api: respx.MockRouter, send: Send) -> None:
    api.post(MESSAGES_URL).respond(429, headers={"Retry-After": "3"}, text="slow down")
    result = await send(EMAIL, KEY)
    assert result.outcome is Outcome.RETRYABLE
    assert (result.status, result.retry_after, result.detail) == (429, 3.0, "429: slow down")


async def test_429_with_retry_after_as_an_http_date(api: respx.MockRouter, send: Send) -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    header = email.utils.format_datetime(when, usegmt=True)
    api.post(MESSAGES_URL).respond(429, headers={"Retry-After": header})
    result = await send(EMAIL, KEY)
    assert result.outcome is Outcome.RETRYABLE and result.status == 429
    assert result.retry_after is not None and 28.0 <= result.retry_after <= 30.0


@pytest.mark.parametrize("header", [None, "soon", "-5"])
async def test_429_without_a_usable_retry_after(
    api: respx.MockRouter, send: Send, header: str | None
) -> None:
    headers = {} if header is None else {"Retry-After": header}
    api.post(MESSAGES_URL).respond(429, headers=headers)
    result = await send(EMAIL, KEY)
    assert result.outcome is Outcome.RETRYABLE
    # A negative delay means "now"; garbage or nothing leaves the backoff to the caller.
    assert result.retry_after == (0.0 if header == "-5" else None)


@pytest.mark.parametrize("status", [408, 500, 502, 503, 504])
async def test_server_errors_are_retryable(api: respx.MockRouter, send: Send, status: int) -> None:
    api.post(MESSAGES_URL).respond(status, text="oops")
    result = await send(EMAIL, KEY)
    assert result == SendResult(Outcome.RETRYABLE, status, detail=f"{status}: oops")


@pytest.mark.parametrize(
    ("error", "detail_start"),
    [
        (httpx.ReadTimeout("read timed out"), "timeout (ReadTimeout)"),
        (httpx.ConnectTimeout("connect timed out"), "timeout (ConnectTimeout)"),
        (httpx.PoolTimeout("no free connection"), "timeout (PoolTimeout)"),
        (httpx.ConnectError("connection refused"), "connection error: ConnectError"),
        (httpx.RemoteProtocolError("peer closed"), "connection error: RemoteProtocolError"),
        (httpx.ReadError("connection reset"), "connection error: ReadError"),
    ],
)
async def test_timeouts_and_connection_errors_are_retryable(
    api: respx.MockRouter, send: Send, error: Exception, detail_start: str
) -> None:
    api.post(MESSAGES_URL).mock(side_effect=error)
    result = await send(EMAIL, KEY)
    assert result.outcome is Outcome.RETRYABLE
    assert result.status is None and result.retry_after is None
    assert result.detail.startswith(detail_start)


def _raised_from(error: httpx.HTTPError, cause: Exception) -> httpx.HTTPError:
    try:
        raise error from cause
    except httpx.HTTPError as raised:
        return raised


@pytest.mark.parametrize(
    ("error", "detail_start"),
    [
        (
            _raised_from(httpx.ConnectTimeout("reset"), aiohttp.ClientOSError(104, "reset")),
            "connection error: ClientOSError(104",
        ),
        (
            _raised_from(httpx.ConnectTimeout("gone"), aiohttp.ServerDisconnectedError()),
            "connection error: ServerDisconnectedError",
        ),
        (
            _raised_from(httpx.ReadTimeout("slow"), aiohttp.SocketTimeoutError("read")),
            "timeout (ReadTimeout)",
        ),
        (_raised_from(httpx.ReadTimeout("slow"), TimeoutError()), "timeout (ReadTimeout)"),
    ],
)
async def test_aiohttp_errors_behind_the_transport_are_named_for_what_they_are(
    error: httpx.HTTPError, detail_start: str
) -> None:
    # httpx-aiohttp raises ConnectTimeout from any aiohttp connection error, a reset
    # included; respx cannot raise with a cause, so classify_error is called directly.
    result = classify_error(error)
    assert (result.outcome, result.status) == (Outcome.RETRYABLE, None)
    assert result.detail.startswith(detail_start)


async def test_request_shape(api: respx.MockRouter, send: Send) -> None:
    route = api.post(MESSAGES_URL).respond(200, json={"id": "<1@mailbench.test>"})
    await send(EMAIL, KEY)
    await send(EMAIL, KEY)
    assert route.call_count == 2
    for call in route.calls:
        request = call.request
        assert request.method == "POST"
        assert str(request.url) == MESSAGES_URL
        expected_auth = base64.b64encode(b"api:key-secret").decode()
        assert request.headers["Authorization"] == f"Basic {expected_auth}"
        assert request.headers["Idempotency-Key"] == KEY
        assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
        form = parse_qs(request.content.decode(), keep_blank_values=True, strict_parsing=True)
        assert form == {
            "from": [EMAIL.sender],
            "to": [EMAIL.to],
            "subject": [EMAIL.subject],
            "text": [EMAIL.text],
            "v:idempotency_key": [KEY],
        }


async def test_timeouts_are_always_set(api: respx.MockRouter, send: Send) -> None:
    route = api.post(MESSAGES_URL).respond(200, json={"id": "<1@mailbench.test>"})
    await send(EMAIL, KEY)
    # httpx hands the effective timeouts to the transport with every request.
    assert route.calls.last.request.extensions["timeout"] == {
        "connect": 1.5,
        "read": 7.0,
        "write": 7.0,
        "pool": 7.0,
    }
    timeouts = MailgunSettings().timeouts()  # the defaults, too
    for value in (timeouts.connect, timeouts.read, timeouts.write, timeouts.pool):
        assert value is not None and 0 < value <= 30


def _multipart(request: httpx.Request) -> EmailMessage:
    head = f"Content-Type: {request.headers['Content-Type']}\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(head + request.content)
    assert isinstance(message, EmailMessage)  # what a modern policy parses into
    return message


async def test_inline_attachments_go_as_multipart_inline_parts(
    api: respx.MockRouter, send: Send
) -> None:
    route = api.post(MESSAGES_URL).respond(200, json={"id": "<1@mailbench.test>"})
    chart = b"<svg xmlns='http://www.w3.org/2000/svg'/>"
    result = await send(EMAIL, KEY, inline=[("logo.png", PNG), ("chart.svg", chart)])
    assert result.ok
    request = route.calls.last.request
    assert request.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    assert request.headers["Idempotency-Key"] == KEY
    parts = [
        (part.get_param("name", header="content-disposition"), part)
        for part in _multipart(request).iter_parts()
    ]
    fields = {name: part.get_content() for name, part in parts if part.get_filename() is None}
    assert fields == {
        "from": EMAIL.sender,
        "to": EMAIL.to,
        "subject": EMAIL.subject,
        "text": EMAIL.text,
        "v:idempotency_key": KEY,
    }
    files = [
        (name, part.get_filename(), part.get_content_type(), part.get_payload(decode=True))
        for name, part in parts
        if part.get_filename() is not None
    ]
    assert files == [
        ("inline", "logo.png", "image/png", PNG),
        ("inline", "chart.svg", "image/svg+xml", chart),
    ]


async def test_an_unknown_extension_is_sent_as_octet_stream(
    api: respx.MockRouter, send: Send
) -> None:
    route = api.post(MESSAGES_URL).respond(200, json={"id": "<1@mailbench.test>"})
    assert (await send(EMAIL, KEY, inline=[("blob", b"\x00\x01")])).ok
    [part] = [p for p in _multipart(route.calls.last.request).iter_parts() if p.get_filename()]
    assert part.get_content_type() == "application/octet-stream"
