"""The fake Mailgun, started in-process on port 0 and spoken to over real HTTP."""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import servers.fakegun
from harness.errors import ConfigError
from queues.base import Email
from servers.fakegun import (
    FakegunSettings,
    FakeMailgun,
    add_cli_arguments,
    parse_fault,
    settings_from_args,
)
from servers.mailgun import (
    BlockingMailgunClient,
    Inline,
    MailgunClient,
    MailgunSettings,
    Outcome,
    SendResult,
)

KEY = "key-test"
DOMAIN = "mg.test"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"api:{KEY}".encode()).decode()}
SEND = {
    "from": "Bench <bench@mailbench.test>",
    "to": "ada@example.test",
    "subject": "Hi",
    "text": "x",
}
STATS_KEYS = {"received", "accepted", "unique_keys", "duplicates", "in_flight", "by_status"}
STATS_KEYS |= {"faults", "latency"}

# The smallest valid PNG: 1x1, one transparent pixel.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000b49444154789c6360000200000500017a5eab3f0000000049454e44ae426082"
)

Starter = Callable[..., AbstractAsyncContextManager[FakeMailgun]]
ClientSend = Callable[..., Awaitable[SendResult]]


@pytest.fixture
def start() -> Starter:
    """Start a fake with these settings (fixed:0 latency and the test key by default)."""

    @asynccontextmanager
    async def started(**overrides: Any) -> AsyncIterator[FakeMailgun]:
        settings = {"latency": "fixed:0", "api_key": KEY, "seed": 1, **overrides}
        async with FakeMailgun(FakegunSettings(**settings)) as fake:
            yield fake

    return started


@pytest.fixture
async def fake(start: Starter) -> AsyncIterator[FakeMailgun]:
    async with start() as fake:
        yield fake


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def send(
    http: aiohttp.ClientSession,
    fake: FakeMailgun,
    data: Any = None,
    headers: dict[str, str] | None = None,
    domain: str = DOMAIN,
) -> tuple[int, Any]:
    """POST a send; return the status and the JSON body (or the text if not JSON)."""
    url = f"{fake.url}/v3/{domain}/messages"
    async with http.post(url, data=SEND if data is None else data, headers=headers or AUTH) as r:
        body = await r.json() if r.content_type == "application/json" else await r.text()
        return r.status, body


async def admin(http: aiohttp.ClientSession, fake: FakeMailgun, path: str) -> Any:
    method = http.post if path == "reset" else http.get
    async with method(f"{fake.url}/_mailbench/{path}") as response:
        assert response.status == 200
        return await response.json()


# -- sends that are accepted ------------------------------------------------------------


async def test_urlencoded_send_is_queued_and_lands_in_the_ledger(
    fake: FakeMailgun, http: aiohttp.ClientSession
) -> None:
    before = time.time()
    status, body = await send(http, fake)
    assert status == 200
    assert body["message"] == "Queued. Thank you."
    assert re.fullmatch(r"<\d{14}\.[0-9a-f]+@mg\.test>", body["id"])
    [entry] = fake.ledger
    assert entry.message_id == body["id"]
    assert entry.recipients == ["ada@example.test"]
    assert entry.subject == "Hi" and entry.domain == DOMAIN and not entry.testmode
    assert before <= entry.received_at <= entry.accepted_at <= time.time()
    assert (await admin(http, fake, "ledger"))["entries"] == [entry.as_json()]


async def test_multipart_with_attachment_and_repeated_or_listed_recipients(
    fake: FakeMailgun, http: aiohttp.ClientSession
) -> None:
    form = aiohttp.FormData()
    form.add_field("from", "bench@mailbench.test")
    form.add_field("to", "a@example.test, B <b@example.test>")
    form.add_field("to", '"Doe, Jane" <jane@example.test>')
    form.add_field("cc", "c@example.test")
    form.add_field("html", "<p>hi</p>")
    form.add_field("attachment", b"%PDF-1.4 fake", filename="a.pdf")
    status, _ = await send(http, fake, data=form)
    assert status == 200
    assert fake.ledger[0].recipients == [
        "a@example.test",
        "b@example.test",
        "jane@example.test",
        "c@example.test",
    ]


async def test_testmode_is_accepted_but_not_a_delivery(
    fake: FakeMailgun, http: aiohttp.ClientSession
) -> None:
    status, _ = await send(http, fake, data={**SEND, "o:testmode": "yes", "v:idempotency_key": "k"})
    assert status == 200
    assert fake.ledger[0].testmode
    stats = await admin(http, fake, "stats")
    assert stats["accepted"] == 1 and stats["delivered"] == 0 and stats["testmode"] == 1
    assert stats["unique_keys"] == 0


# -- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic " + base64.b64encode(b"api:wrong").decode()},
        {"Authorization": "Basic " + base64.b64encode(f"user:{KEY}".encode()).decode()},
        {"Authorization": "Bearer " + KEY},
        {"Authorization": "Basic !!!"},
    ],
)
async def test_bad_credentials_get_a_plain_forbidden(
    fake: FakeMailgun, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    async with http.post(f"{fake.url}/v3/{DOMAIN}/messages", data=SEND, headers=headers) as r:
        assert r.status == 401
        assert r.content_type == "text/plain"
        assert await r.text() == "Forbidden"
    assert fake.ledger == []
    assert fake.stats()["by_status"] == {"401": 1}


async def test_basic_scheme_is_case_insensitive(
    fake: FakeMailgun, http: aiohttp.ClientSession
) -> None:
    headers = {"Authorization": AUTH["Authorization"].replace("Basic", "basic")}
    assert (await send(http, fake, headers=headers))[0] == 200


async def test_unknown_domain_is_404_when_domains_are_configured(
    start: Starter, http: aiohttp.ClientSession
) -> None:
    async with start(domains=(DOMAIN,)) as fake:
        assert (await send(http, fake))[0] == 200
        status, body = await send(http, fake, domain="other.test")
        assert status == 404
        assert body == {"message": "Domain not found: other.test"}


def _many(n: int) -> str:
    return ",".join(f"r{i}@example.test" for i in range(n))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"to": "a@example.test", "text": "x"}, "'from' parameter is missing"),
        ({**SEND, "to": ""}, "'to' parameter is missing"),
        ({**SEND, "to": "not-an-address"}, "'to' parameter is not a valid address"),
        ({**SEND, "cc": "a@b@c"}, "'cc' parameter is not a valid address"),
        (
            {"from": SEND["from"], "to": SEND["to"], "subject": "no body"},
            "Need at least one of 'text', 'html' or 'template' parameters specified",
        ),
        ({**SEND, "to": _many(1001)}, "Too many recipients: 1001"),
        ({**SEND, "v:blob": "x" * (16 * 1024)}, "exceeds 16KB"),
    ],
)
async def test_invalid_sends_get_400_with_mailgun_messages(
    fake: FakeMailgun, http: aiohttp.ClientSession, data: dict[str, str], message: str
) -> None:
    status, body = await send(http, fake, data=data)
    assert status == 400
    assert message in body["message"]
    assert fake.ledger == []


async def test_exactly_1000_recipients_are_allowed(
    fake: FakeMailgun, http: aiohttp.ClientSession
) -> None:
    assert (await send(http, fake, data={**SEND, "to": _many(1000)}))[0] == 200
    assert len(fake.ledger[0].recipients) == 1000


async def test_attachments_count_toward_the_size_limit(
    fake: FakeMailgun, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(servers.fakegun, "MAX_MESSAGE_BYTES", 10_000)
    form = aiohttp.FormData(SEND)
    form.add_field("attachment", b"x" * 20_000, filename="big.bin")
    status, body = await send(http, fake, data=form)
    assert status == 400
    assert "size" in body["message"]


# -- idempotency keys, duplicates and the admin paths -----------------------------------


async def test_idempotency_key_from_header_then_from_the_v_variable(
    fake: FakeMailgun, http: aiohttp.ClientSession
) -> None:
    await send(http, fake, headers={**AUTH, "Idempotency-Key": "from-header"})
    await send(http, fake, data={**SEND, "v:idempotency_key": "from-variable"})
    await send(
        http,
        fake,
        data={**SEND, "v:idempotency_key": "loser"},
        headers={**AUTH, "Idempotency-Key": "winner"},
    )
    await send(http, fake)
    keys = [entry.idempotency_key for entry in fake.ledger]
    assert keys == ["from-header", "from-variable", "winner", None]


async def test_duplicates_are_delivered_and_counted_by_default(
    fake: FakeMailgun, http: aiohttp.ClientSession
) -> None:
    ids = [(await send(http, fake, data={**SEND, "v:idempotency_key": k}))[1]["id"] for k in "aab"]
    assert len(set(ids)) == 3
    assert len(fake.ledger) == 3
    stats = await admin(http, fake, "stats")
    assert set(stats) >= STATS_KEYS
    assert stats["received"] == 3 and stats["accepted"] == 3
    assert stats["unique_keys"] == 2 and stats["duplicates"] == 1
    assert stats["by_status"] == {"200": 3}
    assert stats["in_flight"] == 0
    assert stats["latency"] == "fixed:0.0"


async def test_dedupe_mode_replays_the_first_answer(
    start: Starter, http: aiohttp.ClientSession
) -> None:
    async with start(dedupe=True) as fake:
        headers = {**AUTH, "Idempotency-Key": "job-1"}
        first = await send(http, fake, headers=headers)
        again = await send(http, fake, headers=headers)
        assert first == again
        assert first[0] == 200
        assert len(fake.ledger) == 1
        stats = fake.stats()
        assert stats["replayed"] == 1 and stats["duplicates"] == 0 and stats["unique_keys"] == 1


async def test_reset_clears_the_ledger_and_the_counters(
    fake: FakeMailgun, http: aiohttp.ClientSession
) -> None:
    await send(http, fake)
    await send(http, fake, data={})
    assert await admin(http, fake, "reset") == {"ok": True}
    assert (await admin(http, fake, "ledger")) == {"entries": []}
    stats = await admin(http, fake, "stats")
    assert stats["received"] == stats["accepted"] == 0
    assert stats["by_status"] == {}


# -- faults -----------------------------------------------------------------------------


async def test_a_503_fault_is_answered_and_not_delivered(
    start: Starter, http: aiohttp.ClientSession
) -> None:
    async with start(faults=(parse_fault("503:1.0"),)) as fake:
        status, body = await send(http, fake)
        assert status == 503 and "message" in body
        assert fake.ledger == []
        stats = fake.stats()
        assert stats["faults"] == {"503": 1} and stats["by_status"] == {"503": 1}


async def test_a_429_fault_says_when_to_retry(start: Starter, http: aiohttp.ClientSession) -> None:
    async with (
        start(faults=(parse_fault("429:1"),)) as fake,
        http.post(f"{fake.url}/v3/{DOMAIN}/messages", data=SEND, headers=AUTH) as response,
    ):
        assert response.status == 429
        assert response.headers["Retry-After"] == "1"


async def test_a_reset_fault_drops_the_connection(
    start: Starter, http: aiohttp.ClientSession
) -> None:
    async with start(faults=(parse_fault("reset:1.0"),)) as fake:
        with pytest.raises(aiohttp.ClientConnectionError):
            await send(http, fake)
        stats = fake.stats()
        assert stats["faults"] == {"reset": 1}
        assert stats["by_status"] == {} and stats["received"] == 1
        assert fake.ledger == []


async def test_a_hang_outlasts_the_client_timeout_and_stop_releases_it(
    start: Starter, http: aiohttp.ClientSession
) -> None:
    async with start(faults=(parse_fault("hang:1.0"),)) as fake:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await send(http, fake)
        assert fake.stats()["in_flight"] == 1
        began = time.monotonic()
    assert time.monotonic() - began < 10  # stop() did not wait the 120 s hang out


async def test_faults_follow_their_probability_and_the_seed(
    start: Starter, http: aiohttp.ClientSession
) -> None:
    outcomes = []
    for _ in range(2):
        async with start(seed=5, faults=(parse_fault("503:0.3"), parse_fault("500:0.2"))) as fake:
            outcomes.append([(await send(http, fake))[0] for _ in range(200)])
    assert outcomes[0] == outcomes[1]
    counts = {status: outcomes[0].count(status) for status in (200, 500, 503)}
    assert 30 <= counts[500] <= 55 and 45 <= counts[503] <= 80 and sum(counts.values()) == 200


@pytest.mark.parametrize("text", ["503", "503:x", "503:1.5", "302:0.1", "boom:0.1", "reset:-1"])
def test_malformed_faults_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="reset:PROB"):
        parse_fault(text)


def test_fault_probabilities_may_not_add_up_past_one() -> None:
    faults = (parse_fault("503:0.6"), parse_fault("reset:0.6"))
    with pytest.raises(ConfigError, match="more than 1"):
        FakeMailgun(FakegunSettings(faults=faults))


# -- latency ----------------------------------------------------------------------------


async def test_achieved_latency_matches_a_fixed_model(
    start: Starter, http: aiohttp.ClientSession
) -> None:
    async with start(latency="fixed:0.05") as fake:
        await send(http, fake)  # connection set up outside the measurement

        async def timed() -> float:
            began = time.perf_counter()
            assert (await send(http, fake))[0] == 200
            return time.perf_counter() - began

        sequential = [await timed() for _ in range(10)]
        held_alone = [entry.accepted_at - entry.received_at for entry in fake.ledger[1:]]
        concurrent = await asyncio.gather(*(timed() for _ in range(30)))
        held = [entry.accepted_at - entry.received_at for entry in fake.ledger]
    assert min(*sequential, *concurrent) >= 0.049
    # As the fake saw it: never early, and on time within a few ms when the loop is idle.
    assert min(held) >= 0.049
    assert statistics.median(held_alone) == pytest.approx(0.05, abs=0.005)
    # Generous upper bounds: the client shares this loop, and shared machines stall.
    assert statistics.median(held) < 0.05 + 0.05
    assert statistics.median(sequential) < 0.05 + 0.02
    assert statistics.median(concurrent) < 0.05 + 0.2


async def test_parsing_time_is_absorbed_into_the_latency(
    start: Starter, http: aiohttp.ClientSession
) -> None:
    async with start(latency="fixed:0.2") as fake:
        form = aiohttp.FormData(SEND)
        form.add_field("attachment", io.BytesIO(b"x" * 5_000_000), filename="big.bin")
        began = time.perf_counter()
        assert (await send(http, fake, data=form))[0] == 200
        elapsed = time.perf_counter() - began
        entry = fake.ledger[0]
    assert 0.2 - 0.002 <= entry.accepted_at - entry.received_at < 0.2 + 0.1
    assert elapsed < 0.2 + 0.5


# -- mailbench's own client against the fake -------------------------------------------


@pytest.fixture(params=["async", "blocking"])
def client_send(request: pytest.FixtureRequest) -> Callable[..., ClientSend]:
    """``client_send(fake, timeout=...)``: one send through either client, then closed."""

    def bind(fake: FakeMailgun, timeout: float = 5.0) -> ClientSend:
        settings = MailgunSettings(base_url=fake.url, api_key=KEY, domain=DOMAIN, timeout=timeout)

        async def send_async(email: Email, key: str, *, inline: Inline = ()) -> SendResult:
            client = MailgunClient(settings)
            try:
                return await client.send(email, key, inline=inline)
            finally:
                await client.aclose()

        async def send_blocking(email: Email, key: str, *, inline: Inline = ()) -> SendResult:
            def call() -> SendResult:
                client = BlockingMailgunClient(settings)
                try:
                    return client.send(email, key, inline=inline)
                finally:
                    client.close()

            return await asyncio.to_thread(call)

        return send_async if request.param == "async" else send_blocking

    return bind


EMAIL = Email(to="ada@example.test", subject="Your chart", text="See the picture.")


async def test_the_client_sends_an_inline_png(
    fake: FakeMailgun, client_send: Callable[..., ClientSend], monkeypatch: pytest.MonkeyPatch
) -> None:
    send = client_send(fake)
    result = await send(EMAIL, "inline-1", inline=[("chart.png", PNG)])
    assert result.ok
    [entry] = fake.ledger
    assert (entry.message_id, entry.idempotency_key) == (result.message_id, "inline-1")
    assert entry.recipients == [EMAIL.to] and entry.subject == EMAIL.subject
    # The PNG reached the fake: it counts toward the size limit.
    text_size = sum(map(len, (EMAIL.sender, EMAIL.to, EMAIL.subject, EMAIL.text, "inline-2")))
    monkeypatch.setattr(servers.fakegun, "MAX_MESSAGE_BYTES", text_size + len(PNG) - 1)
    assert (await send(EMAIL, "inline-2")).ok
    refused = await send(EMAIL, "inline-3", inline=[("chart.png", PNG)])
    assert (refused.outcome, refused.status) == (Outcome.PERMANENT, 400)
    assert "size" in refused.detail


# -- the official Mailgun SDK, unchanged ------------------------------------------------


async def test_the_official_mailgun_sdk_sends_through_the_fake(fake: FakeMailgun) -> None:
    from mailgun.client import Client

    def sdk_send(key: str) -> tuple[int, Any]:
        with Client(auth=("api", key), api_url=fake.url) as client:
            response = client.messages.create(
                data={
                    "from": "Bench <bench@mailbench.test>",
                    "to": ["ada@example.test", "bob@example.test"],
                    "subject": "From the SDK",
                    "text": "Hello",
                    "v:idempotency_key": "sdk-1",
                },
                files=[("attachment", ("note.txt", b"hello"))],
                domain=DOMAIN,
            )
            return response.status_code, response.json() if response.ok else response.text

    status, body = await asyncio.to_thread(sdk_send, KEY)
    assert status == 200 and body["message"] == "Queued. Thank you."
    [entry] = fake.ledger
    assert entry.message_id == body["id"]
    assert entry.recipients == ["ada@example.test", "bob@example.test"]
    assert entry.subject == "From the SDK" and entry.idempotency_key == "sdk-1"
    assert await asyncio.to_thread(sdk_send, "wrong") == (401, "Forbidden")


# -- command line -----------------------------------------------------------------------


def test_cli_arguments_build_the_settings() -> None:
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    defaults = settings_from_args(parser.parse_args([]))
    assert (defaults.host, defaults.port, defaults.latency) == (
        "127.0.0.1",
        8025,
        "uniform:0.5,1.0",
    )
    options = {"--port": "0", "--latency": "fixed:0.1", "--seed": "3", "--api-key": "k"}
    argv = [word for option in options.items() for word in option] + ["--dedupe"]
    argv += ["--domain", "a.test", "--domain", "b.test"]
    argv += ["--fault", "503:0.01", "--fault", "reset:0.02"]
    args = parser.parse_args(argv)
    settings = settings_from_args(args)
    assert settings.domains == ("a.test", "b.test")
    assert [str(f) for f in settings.faults] == ["503:0.01", "reset:0.02"]
    assert (settings.latency, settings.seed, settings.dedupe, settings.api_key) == (
        "fixed:0.1",
        3,
        True,
        "k",
    )


def test_the_server_announces_its_address_and_stops_on_sigterm() -> None:
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-m", "servers.fakegun", "--port", "0", "--latency", "fixed:0.1"]
    proc = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert re.fullmatch(
            r"fakegun listening on http://127\.0\.0\.1:\d+ \(latency fixed:0\.1\)\n", line
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


async def test_a_taken_port_is_a_config_error(fake: FakeMailgun) -> None:
    port = int(fake.url.rsplit(":", 1)[1])
    with pytest.raises(ConfigError, match="cannot listen"):
        await FakeMailgun(FakegunSettings(port=port, latency="fixed:0")).start()
