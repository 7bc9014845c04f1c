"""The reference server against the fake Mailgun, both in-process."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from servers.fakegun.faults import parse_fault
from servers.fakegun.server import FakegunSettings, FakeMailgun
from servers.mailgun import MailgunSettings
from servers.web.app import ServerSettings, create_app

pytestmark = pytest.mark.integration

FORM = {"to": "ada@example.com", "subject": "Hello", "message": "Hi from the test"}
JSON = {"Accept": "application/json"}


@pytest.fixture
def fake() -> Iterator[FakeMailgun]:
    # In its own thread and event loop: the blocking mode stalls the test's loop on
    # purpose, and an in-loop fake could then never answer.
    fake = FakeMailgun(FakegunSettings(latency="fixed:0.01", seed=1))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(fake.start(), loop).result(10)
    yield fake
    asyncio.run_coroutine_threadsafe(fake.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


async def client_for(settings: ServerSettings) -> TestClient:  # type: ignore[type-arg]
    client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    return client


async def filled(client: TestClient, **changes: str) -> dict[str, str]:  # type: ignore[type-arg]
    """The form as a browser sends it: loaded first (which sets the CSRF cookie in the
    client's jar), then filled in, with the page's token."""
    page = await (await client.get("/")).text()
    token = re.search(r'name="csrf_token" value="([^"]*)"', page)
    assert token is not None
    return {**FORM, **changes, "csrf_token": token.group(1)}


@pytest.fixture(params=["direct", "blocking"])
async def client(
    request: pytest.FixtureRequest, fake: FakeMailgun, tmp_path: Path
) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    settings = ServerSettings(
        mode=request.param,
        mailgun=MailgunSettings(base_url=fake.url),
        metrics_out=tmp_path / "server.json",
    )
    client = await client_for(settings)
    yield client
    await client.close()


async def test_form_page(client: TestClient) -> None:  # type: ignore[type-arg]
    response = await client.get("/")
    assert response.status == 200
    assert response.content_type == "text/html"
    assert '<form method="post" action="/send">' in await response.text()


async def test_send_delivers_with_job_id_as_idempotency_key(
    client: TestClient,  # type: ignore[type-arg]
    fake: FakeMailgun,
) -> None:
    response = await client.post("/send", data=await filled(client), headers=JSON)
    assert response.status == 200
    body = await response.json()
    assert body["status"] == "sent"
    [entry] = fake.ledger
    assert entry.idempotency_key == body["job_id"]
    assert list(entry.recipients) == ["ada@example.com"]
    assert entry.subject == "Hello"


async def test_send_as_html_confirms(client: TestClient) -> None:  # type: ignore[type-arg]
    response = await client.post("/send", data=await filled(client))
    assert response.status == 200
    assert "is sent" in await response.text()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"to": "nobody"}, "not a valid email address"),
        ({"subject": "Hi\r\nBcc: x@example.com"}, "single line"),
        ({"message": ""}, "Enter a message"),
    ],
)
async def test_invalid_form_rerenders_with_400(
    client: TestClient,  # type: ignore[type-arg]
    fake: FakeMailgun,
    change: dict[str, str],
    message: str,
) -> None:
    response = await client.post("/send", data=await filled(client, **change))
    assert response.status == 400
    page = await response.text()
    assert message in page
    assert "<form" in page
    response = await client.post("/send", data=await filled(client, **change), headers=JSON)
    assert response.status == 400
    assert message in (await response.json())["error"]
    assert fake.ledger == []


async def test_oversized_body_is_refused_not_500(client: TestClient) -> None:  # type: ignore[type-arg]
    response = await client.post("/send", data=await filled(client, message="x" * 200_000))
    assert response.status == 413
    assert "larger than" in await response.text()


async def test_non_form_body_is_a_415(client: TestClient) -> None:  # type: ignore[type-arg]
    response = await client.post("/send", json=FORM, headers=JSON)
    assert response.status == 415
    assert "x-www-form-urlencoded" in (await response.json())["error"]


async def test_broken_bytes_are_a_400(client: TestClient) -> None:  # type: ignore[type-arg]
    response = await client.post(
        "/send",
        data=b"to=%FF%FE&subject=a&message=b",
        headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8", **JSON},
    )
    assert response.status == 400


async def test_metrics_written_at_shutdown(fake: FakeMailgun, tmp_path: Path) -> None:
    out = tmp_path / "server.json"
    client = await client_for(
        ServerSettings(mode="direct", mailgun=MailgunSettings(base_url=fake.url), metrics_out=out)
    )
    for _ in range(3):
        assert (await client.post("/send", data=await filled(client), headers=JSON)).status == 200
    await client.close()
    snapshot = json.loads(out.read_text())
    assert snapshot["accepted"] == 3 == len(fake.ledger)  # a count: nothing grows per job
    assert "api" in snapshot["histograms"]


async def test_api_failure_is_not_accepted(tmp_path: Path) -> None:
    settings = FakegunSettings(latency="fixed:0.001", seed=1, faults=(parse_fault("503:1.0"),))
    async with FakeMailgun(settings) as failing:
        client = await client_for(
            ServerSettings(mode="direct", mailgun=MailgunSettings(base_url=failing.url))
        )
        response = await client.post("/send", data=await filled(client), headers=JSON)
        assert response.status == 503
        assert "did not take it" in (await response.json())["error"]
        await client.close()


@pytest.mark.parametrize("mode", ["direct", "blocking"])
async def test_in_request_api_times_are_kept_by_outcome(mode: str, tmp_path: Path) -> None:
    """A refused call is no send: its time goes to api_retryable, not api."""
    out = tmp_path / "server.json"
    settings = FakegunSettings(latency="fixed:0.001", seed=1, faults=(parse_fault("503:1.0"),))
    async with FakeMailgun(settings) as failing:
        server = ServerSettings(
            mode=mode, mailgun=MailgunSettings(base_url=failing.url), metrics_out=out
        )
        client = await client_for(server)
        response = await client.post("/send", data=await filled(client), headers=JSON)
        assert response.status == 503
        await client.close()
    histograms = json.loads(out.read_text())["histograms"]
    assert "api_retryable" in histograms and "api" not in histograms


async def test_wrong_api_key_is_a_permanent_failure(fake: FakeMailgun) -> None:
    client = await client_for(
        ServerSettings(mode="direct", mailgun=MailgunSettings(base_url=fake.url, api_key="nope"))
    )
    response = await client.post("/send", data=await filled(client), headers=JSON)
    assert response.status == 502
    assert "401" in (await response.json())["error"]
    await client.close()


async def test_every_answer_says_the_handlers_own_time(fake: FakeMailgun) -> None:
    settings = ServerSettings(mode="direct", mailgun=MailgunSettings(base_url=fake.url))
    client = await client_for(settings)
    try:
        page = await client.get("/")
        sent = await client.post("/send", data=await filled(client), headers=JSON)
        for response in (page, sent):
            header = response.headers["Server-Timing"]
            match = re.fullmatch(r"app;dur=(\d+\.\d{3})", header)
            assert match is not None, header
        # POST /send waited for the API (10 ms in this fake) inside the handler.
        page_ms = float(page.headers["Server-Timing"].split("=")[1])
        sent_ms = float(sent.headers["Server-Timing"].split("=")[1])
        assert sent_ms >= 10 and page_ms < sent_ms
    finally:
        await client.close()
