"""The reference server against hostile input: CSRF, header injection, bodies that are
not forms, escaping. In-process, against the memory queue (a queued mode) and, for the
direct mode, a stubbed Mailgun API: every refused request must leave nothing behind."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs

import aiohttp
import httpx
import itsdangerous.timed
import pytest
import respx
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from queues import Job
from queues.memory import MemoryQueue, open_memory
from servers.mailgun import MailgunSettings
from servers.web.app import STATE, ServerSettings, create_app
from servers.web.csrf import COOKIE, MAX_AGE_S, Csrf, CsrfError
from servers.web.forms import MAX_BODY_BYTES

pytestmark = pytest.mark.timeout(30)

Client = TestClient[web.Request, web.Application]
SECRET = "hostile-input-test-secret"
FORM = {"to": "ada@example.com", "subject": "Hello", "message": "Hi there"}
JSON = {"Accept": "application/json"}
API = "http://mailgun.test"


@pytest.fixture
async def queue_url() -> str:
    return f"memory://{uuid.uuid4().hex}"


@pytest.fixture
async def client(queue_url: str) -> AsyncIterator[Client]:
    """A browser-like client (it keeps cookies) of a server in a queued mode."""
    settings = ServerSettings(mode="sqlite", queue_url=queue_url, csrf_secret=SECRET)
    client: Client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    yield client
    await client.close()


@pytest.fixture
async def queue(queue_url: str) -> MemoryQueue:
    return await open_memory(queue_url, "mailbench")


async def queued(queue: MemoryQueue) -> list[Job]:
    """Every job on the queue, taken off it."""
    jobs: list[Job] = []
    count = await queue.depth()
    if count:
        deliveries = queue.consume(prefetch=count)
        for _ in range(count):
            delivery = await anext(deliveries)
            jobs.append(delivery.job)
            await queue.ack(delivery)
        await deliveries.aclose()  # type: ignore[attr-defined]
    return jobs


async def token_of(client: Client) -> str:
    """Load the form as a browser does (the jar keeps the cookie) and take its token."""
    page = await (await client.get("/")).text()
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found is not None, page
    return found.group(1)


async def filled(client: Client, **changes: str) -> dict[str, str]:
    return {**FORM, **changes, "csrf_token": await token_of(client)}


def cookie_of(client: Client) -> str:
    return client.session.cookie_jar.filter_cookies(client.make_url("/"))[COOKIE].value


# --- CSRF -----------------------------------------------------------------------------


async def test_form_page_sets_a_strict_http_only_cookie_once(client: Client) -> None:
    first = await client.get("/")
    set_cookie = first.headers["Set-Cookie"]
    assert set_cookie.startswith(f"{COOKIE}=")
    attributes = {part.strip().lower() for part in set_cookie.split(";")[1:]}
    assert attributes == {"httponly", "path=/", "samesite=strict"}
    assert first.headers["X-Frame-Options"] == "DENY"
    again = await client.get("/")  # the jar sends the cookie back: no new one
    assert "Set-Cookie" not in again.headers
    assert cookie_of(client) not in await again.text()  # the HttpOnly value stays hidden


async def test_every_visitor_gets_their_own_cookie(client: Client) -> None:
    cookies = set()
    for _ in range(3):
        client.session.cookie_jar.clear()
        await client.get("/")
        cookies.add(cookie_of(client))
    assert len(cookies) == 3


async def test_a_form_with_a_valid_token_is_queued(client: Client, queue: MemoryQueue) -> None:
    response = await client.post("/send", data=await filled(client), headers=JSON)
    assert response.status == 202, await response.text()
    [job] = await queued(queue)
    assert (job.email.to, job.email.subject, job.email.text) == (
        "ada@example.com",
        "Hello",
        "Hi there",
    )


async def refused_403(client: Client, queue: MemoryQueue, data: Any, words: str) -> None:
    response = await client.post("/send", data=data, headers=JSON)
    assert response.status == 403
    body = await response.json()
    assert body["field"] == "csrf_token"
    assert words in body["error"]
    assert await queued(queue) == []


async def test_no_cookie_is_refused(client: Client, queue: MemoryQueue) -> None:
    data = await filled(client)
    client.session.cookie_jar.clear()
    await refused_403(client, queue, data, "cookie is missing")


async def test_no_token_is_refused(client: Client, queue: MemoryQueue) -> None:
    await client.get("/")
    await refused_403(client, queue, FORM, "no security token")


@pytest.mark.parametrize(
    "token", ["", "x", "AAAAAA.BBBB", "aa.bb.cc", "\u00e9\u00e9.\u00e9", "..", "a" * 5000]
)
async def test_a_forged_token_is_refused(client: Client, queue: MemoryQueue, token: str) -> None:
    await client.get("/")
    words = "no security token" if not token else "does not match"
    await refused_403(client, queue, {**FORM, "csrf_token": token}, words)


async def test_a_token_of_another_cookie_is_refused(client: Client, queue: MemoryQueue) -> None:
    theirs = await token_of(client)
    client.session.cookie_jar.clear()
    await client.get("/")  # a new visitor, with a new cookie
    await refused_403(client, queue, {**FORM, "csrf_token": theirs}, "does not match")


async def test_a_token_signed_with_another_secret_is_refused(
    client: Client, queue: MemoryQueue
) -> None:
    await client.get("/")
    forged = Csrf("not the server's secret").token(cookie_of(client))
    await refused_403(client, queue, {**FORM, "csrf_token": forged}, "does not match")


async def test_an_old_token_is_refused(
    client: Client, queue: MemoryQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    five_hours_ago = time.time() - MAX_AGE_S - 3600
    monkeypatch.setattr(itsdangerous.timed, "time", SimpleNamespace(time=lambda: five_hours_ago))
    token = await token_of(client)  # signed five hours ago
    monkeypatch.undo()
    await refused_403(client, queue, {**FORM, "csrf_token": token}, "older than 4 hours")


async def test_two_tokens_are_refused(client: Client, queue: MemoryQueue) -> None:
    token = await token_of(client)
    data = [*FORM.items(), ("csrf_token", token), ("csrf_token", token)]
    await refused_403(client, queue, data, "no security token")


async def test_a_refused_form_comes_back_filled_in_with_a_fresh_token(client: Client) -> None:
    await client.get("/")
    client.session.cookie_jar.clear()
    response = await client.post("/send", data={**FORM, "subject": "Kept <b>"})
    assert response.status == 403
    page = await response.text()
    assert 'value="Kept &lt;b&gt;"' in page  # nothing the visitor typed is lost
    token = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert token is not None and "Set-Cookie" in response.headers
    # The page is a working form: sent again as is, it goes through.
    again = await client.post("/send", data={**FORM, "csrf_token": token.group(1)}, headers=JSON)
    assert again.status == 202


def test_the_secret_comes_from_the_environment() -> None:
    cookie = Csrf.new_cookie()
    one = Csrf.from_environment({"MAILBENCH_SECRET": "shared"})
    other = Csrf.from_environment({"MAILBENCH_SECRET": "shared"})
    other.check(cookie, one.token(cookie))  # two processes, one secret: accepted
    alone = Csrf.from_environment({})
    with pytest.raises(CsrfError):
        alone.check(cookie, one.token(cookie))


def test_the_server_reads_mailbench_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILBENCH_SECRET", "from-the-environment")
    app = create_app(ServerSettings(mode="sqlite", queue_url="memory://"))
    cookie = Csrf.new_cookie()
    app[STATE].csrf.check(cookie, Csrf("from-the-environment").token(cookie))
    assert "from-the-environment" not in repr(app[STATE].settings)


# --- header injection and control characters -------------------------------------------

BREAKS = ["\r\n", "\n", "\r", "\u2028", "\u2029", "\x00"]


@pytest.mark.parametrize("field", ["to", "subject"])
@pytest.mark.parametrize("char", BREAKS)
async def test_a_line_break_or_nul_in_a_header_field_is_a_400(
    client: Client, queue: MemoryQueue, field: str, char: str
) -> None:
    value = f"{FORM[field]}{char}Bcc: victim@example.com"
    response = await client.post("/send", data=await filled(client, **{field: value}), headers=JSON)
    assert response.status == 400
    body = await response.json()
    assert body["field"] == field
    assert ("single line" if char != "\x00" else "U+0000") in body["error"]
    assert await queued(queue) == []


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b", "\x7f"])
async def test_control_characters_in_the_message_are_a_400(
    client: Client, queue: MemoryQueue, char: str
) -> None:
    data = await filled(client, message=f"Hello{char}[2J")
    response = await client.post("/send", data=data, headers=JSON)
    assert response.status == 400
    assert (await response.json())["field"] == "message"
    assert await queued(queue) == []


async def test_line_breaks_in_the_message_are_text(client: Client, queue: MemoryQueue) -> None:
    text = "Dear Ada,\r\n\r\n\tthanks.\r\nBcc: not a header\r\n"
    response = await client.post("/send", data=await filled(client, message=text), headers=JSON)
    assert response.status == 202
    [job] = await queued(queue)
    assert job.email.text == text


async def test_an_invalid_address_is_a_400_naming_the_field(client: Client) -> None:
    response = await client.post("/send", data=await filled(client, to="ada@"), headers=JSON)
    assert response.status == 400
    body = await response.json()
    assert body["field"] == "to" and "not a valid email address" in body["error"]


# --- bodies that are not forms -----------------------------------------------------------


async def post_raw(client: Client, body: bytes, content_type: str | None) -> Any:
    headers = {**JSON, "Content-Type": content_type} if content_type else JSON
    skip = () if content_type else ("Content-Type",)
    return await client.post("/send", data=body, headers=headers, skip_auto_headers=skip)


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "text/plain",
        "application/xml",
        "text/html; charset=utf-8",
        None,
        "application/x-www-form-urlencoded; charset=latin-1",
        "multipart/form-data; boundary=x; charset=utf-16",
    ],
)
async def test_a_wrong_content_type_is_a_415(
    client: Client, queue: MemoryQueue, content_type: str | None
) -> None:
    await client.get("/")
    response = await post_raw(client, b"to=ada%40example.com&subject=a&message=b", content_type)
    assert response.status == 415
    error = (await response.json())["error"]
    assert "x-www-form-urlencoded" in error or "UTF-8" in error
    assert await queued(queue) == []


async def test_a_json_body_is_a_415_also_as_html(client: Client) -> None:
    await client.get("/")
    response = await client.post("/send", json=FORM)
    assert response.status == 415
    assert "multipart/form-data" in await response.text()


@pytest.mark.parametrize("multipart", [False, True])
async def test_an_oversize_body_is_a_413(
    client: Client, queue: MemoryQueue, multipart: bool
) -> None:
    data: Any = await filled(client, message="x" * (MAX_BODY_BYTES + 1))
    if multipart:
        form = aiohttp.FormData(data)
        form._is_multipart = True  # as a browser with enctype="multipart/form-data"
        data = form
    response = await client.post("/send", data=data, headers=JSON)
    assert response.status == 413
    assert "larger than 64 KiB" in (await response.json())["error"]
    assert await queued(queue) == []


async def test_too_many_fields_are_a_413(client: Client) -> None:
    data = [*(await filled(client)).items(), *(("extra", "x") for _ in range(200))]
    response = await client.post("/send", data=data, headers=JSON)
    assert response.status == 413
    assert "100 fields" in (await response.json())["error"]


def multipart(*parts: tuple[str, bytes], boundary: str = "b0undary") -> tuple[bytes, str]:
    """A multipart body from raw part headers and bodies, for bytes aiohttp won't make."""
    chunks = [
        f"--{boundary}\r\n{headers}\r\n\r\n".encode() + body + b"\r\n" for headers, body in parts
    ]
    return b"".join(
        chunks
    ) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def text_part(name: str, value: str, extra: str = "") -> tuple[str, bytes]:
    return f'Content-Disposition: form-data; name="{name}"{extra}', value.encode()


@pytest.mark.parametrize(
    ("body", "content_type", "words"),
    [
        (b"to=\xff\xfe&subject=a&message=b", "application/x-www-form-urlencoded", "UTF-8"),
        (b"to=a%40b.c&subject=%FF&message=b", "application/x-www-form-urlencoded", "UTF-8"),
        (b"to=a%40b.c&subject=a&message=%C3%28", "application/x-www-form-urlencoded", "UTF-8"),
        (
            *multipart(
                text_part("to", "ada@example.com"),
                ('Content-Disposition: form-data; name="subject"', b"\xff\xfe"),
            ),
            "UTF-8",
        ),
        (
            *multipart(
                text_part("to", "ada@example.com"),
                (
                    'Content-Disposition: form-data; name="subject"\r\n'
                    "Content-Type: text/plain; charset=no-such-charset",
                    b"Hello",
                ),
            ),
            "could not be read",
        ),
        (
            *multipart(
                (
                    'Content-Disposition: form-data; name="subject"\r\n'
                    "Content-Transfer-Encoding: rot13",
                    b"Hello",
                ),
            ),
            "could not be read",
        ),
        (b"--x\r\nno headers here", "multipart/form-data; boundary=x", "could not be read"),
        (b"anything", "multipart/form-data", "could not be read"),
        (*multipart(("Content-Disposition: form-data", b"no name")), "could not be read"),
    ],
)
async def test_unreadable_bytes_are_a_400_never_a_500(
    client: Client, queue: MemoryQueue, body: bytes, content_type: str, words: str
) -> None:
    await client.get("/")
    response = await post_raw(client, body, content_type)
    assert response.status == 400, await response.text()
    assert words in (await response.json())["error"]
    response = await post_raw(client, body, content_type)
    assert response.status == 400
    assert await queued(queue) == []


async def test_a_multipart_form_is_read_like_a_urlencoded_one(
    client: Client, queue: MemoryQueue
) -> None:
    data = await filled(client, subject="Grüße")
    body, content_type = multipart(*(text_part(name, value) for name, value in data.items()))
    response = await post_raw(client, body, content_type)
    assert response.status == 202, await response.text()
    [job] = await queued(queue)
    assert job.email.subject == "Grüße"


async def test_a_real_replacement_character_is_text(client: Client, queue: MemoryQueue) -> None:
    data = await filled(client, subject="\ufffd sent as such")
    response = await client.post("/send", data=data, headers=JSON)
    assert response.status == 202
    assert (await queued(queue))[0].email.subject == "\ufffd sent as such"


@pytest.mark.parametrize("missing", ["to", "subject", "message"])
async def test_a_missing_field_is_a_400_naming_it(client: Client, missing: str) -> None:
    data = await filled(client)
    del data[missing]
    response = await client.post("/send", data=data, headers=JSON)
    assert response.status == 400
    body = await response.json()
    assert body["field"] == missing and repr(missing) in body["error"]


async def test_a_field_sent_twice_is_a_400(client: Client, queue: MemoryQueue) -> None:
    data = [*(await filled(client)).items(), ("to", "mallory@example.com")]
    response = await client.post("/send", data=data, headers=JSON)
    assert response.status == 400
    assert "more than once" in (await response.json())["error"]
    assert await queued(queue) == []


async def test_a_file_where_text_is_expected_is_a_400(client: Client) -> None:
    form = aiohttp.FormData(await filled(client))
    form.add_field("message", b"GIF89a", filename="x.gif", content_type="image/gif")
    response = await client.post("/send", data=form, headers=JSON)
    assert response.status == 400
    assert "more than once" in (await response.json())["error"]
    data = {**(await filled(client))}
    del data["message"]
    form = aiohttp.FormData(data)
    form.add_field("message", b"GIF89a", filename="x.gif", content_type="image/gif")
    response = await client.post("/send", data=form, headers=JSON)
    assert response.status == 400
    assert "must be text" in (await response.json())["error"]


# --- escaping ---------------------------------------------------------------------------

HOSTILE = {"to": '"><script>alert(1)</script>', "subject": 'a" autofocus onfocus="alert(2)'}


async def test_echoed_values_are_escaped_in_the_form(client: Client) -> None:
    response = await client.post("/send", data=await filled(client, **HOSTILE))
    assert response.status == 400
    page = await response.text()
    assert "<script>" not in page and 'onfocus="' not in page
    assert 'value="&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;"' in page
    assert 'value="a&quot; autofocus onfocus=&quot;alert(2)"' in page


async def test_json_replies_carry_no_markup(client: Client) -> None:
    response = await client.post("/send", data=await filled(client, **HOSTILE), headers=JSON)
    assert response.status == 400
    raw = await response.read()
    assert b"<" not in raw and b">" not in raw
    assert "<script>alert(1)</script>" in json.loads(raw)["error"]  # escaped, not lost
    assert response.content_type == "application/json"


async def test_the_confirmation_page_escapes_the_address(client: Client) -> None:
    to = "o'brien&co@example.com"
    response = await client.post("/send", data=await filled(client, to=to))
    assert response.status == 202
    page = await response.text()
    assert "o&#x27;brien&amp;co@example.com" in page and to not in page


# --- direct mode: nothing invalid reaches the API ------------------------------------------


@pytest.fixture
def api() -> Iterator[list[dict[str, list[str]]]]:
    """A stubbed Mailgun API; yields the forms it received."""
    sent: list[dict[str, list[str]]] = []

    def accept(request: httpx.Request) -> httpx.Response:
        sent.append(parse_qs(request.content.decode(), keep_blank_values=True))
        return httpx.Response(200, json={"id": f"<{len(sent)}@mailbench.test>", "message": "ok"})

    with respx.mock(using="httpx", assert_all_mocked=True) as router:
        router.post(f"{API}/v3/mailbench.test/messages").mock(side_effect=accept)
        yield sent


@pytest.fixture
async def direct(api: list[dict[str, list[str]]]) -> AsyncIterator[Client]:
    settings = ServerSettings(
        mode="direct", mailgun=MailgunSettings(base_url=API), csrf_secret=SECRET
    )
    client: Client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    yield client
    await client.close()


async def test_direct_mode_sends_only_valid_forms(
    direct: Client, api: list[dict[str, list[str]]]
) -> None:
    for change in ({"subject": "Hi\r\nBcc: x@example.com"}, {"to": "nobody"}, {"message": ""}):
        response = await direct.post("/send", data=await filled(direct, **change), headers=JSON)
        assert response.status == 400
    await direct.post("/send", data=FORM, headers=JSON)  # no token
    assert api == []
    response = await direct.post("/send", data=await filled(direct), headers=JSON)
    assert response.status == 200
    [sent] = api
    assert (sent["to"], sent["subject"], sent["text"]) == (
        ["ada@example.com"],
        ["Hello"],
        ["Hi there"],
    )
