"""The fake Mailgun, started in-process on port 0 and spoken to over real HTTP."""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
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

import servers.fakegun.cli
import servers.fakegun.validate
from harness.errors import ConfigError
from queues.base import Email
from servers.fakegun.cli import add_cli_arguments, settings_from_args
from servers.fakegun.faults import RateLimit, TokenBucket, parse_fault, parse_rate_limit
from servers.fakegun.server import FakegunSettings, FakeMailgun
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
STATS_KEYS |= {"faults", "latency", "delivered", "testmode", "replayed", "rate_limited"}
STATS_KEYS |= {"identity"}  # the harness's token for the process (servers.identity)

# The smallest valid PNG: 1x1, one transparent pixel.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000b49444154789c6360000200000500017a5eab3f0000000049454e44ae426082"
)

Starter = Callable[..., AbstractAsyncContextManager[FakeMailgun]]
ClientSend = Callable[..., Awaitable[SendResult]]


@pytest.fixture
def start() -> Starter:
    """Start a fake with these settings (fixed:0 latency and the test key by default);
    ``clock=`` goes to the fake itself."""

    @asynccontextmanager
    async def started(
        clock: Callable[[], float] | None = None, **overrides: Any
    ) -> AsyncIterator[FakeMailgun]:
        settings = {"latency": "fixed:0", "api_key": KEY, "seed": 1, **overrides}
        async with FakeMailgun(FakegunSettings(**settings), clock=clock) as fake:
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


async def post_raw(
    http: aiohttp.ClientSession, fake: FakeMailgun, data: Any = None, key: str | None = None
) -> tuple[int, str, bytes]:
    """POST a send; return the status, the content type and the body as bytes."""
    headers = AUTH if key is None else {**AUTH, "Idempotency-Key": key}
    url = f"{fake.url}/v3/{DOMAIN}/messages"
    async with http.post(url, data=SEND if data is None else data, headers=headers) as r:
        return r.status, r.content_type, await r.read()


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
    monkeypatch.setattr(servers.fakegun.validate, "MAX_MESSAGE_BYTES", 10_000)
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
    # Idempotency is off by default, as on the real Mailgun: a repeated key is sent again.
    ids = [(await send(http, fake, data={**SEND, "v:idempotency_key": k}))[1]["id"] for k in "aab"]
    assert len(set(ids)) == 3
    assert [entry.idempotency_key for entry in fake.ledger] == ["a", "a", "b"]
    stats = await admin(http, fake, "stats")
    assert set(stats) == STATS_KEYS
    assert stats["received"] == 3 and stats["accepted"] == stats["delivered"] == 3
    assert stats["unique_keys"] == 2 and stats["duplicates"] == 1 and stats["replayed"] == 0
    assert stats["by_status"] == {"200": 3}
    assert stats["in_flight"] == 0 and stats["rate_limited"] == 0
    assert stats["latency"] == "fixed:0.0"


@pytest.mark.parametrize("via", ["header", "variable"])
async def test_idempotency_replays_the_first_answer_and_delivers_once(
    start: Starter, http: aiohttp.ClientSession, via: str
) -> None:
    data = {**SEND, "v:idempotency_key": "job-1"} if via == "variable" else SEND
    headers = {**AUTH, "Idempotency-Key": "job-1"} if via == "header" else AUTH
    async with start(idempotency=True) as fake:
        first = await send(http, fake, data=data, headers=headers)
        again = await send(http, fake, data=data, headers=headers)
        other = await send(http, fake, data={**SEND, "v:idempotency_key": "job-2"})
        assert first[0] == 200 and first == again
        assert other[0] == 200 and other[1]["id"] != first[1]["id"]
        assert [entry.idempotency_key for entry in fake.ledger] == ["job-1", "job-2"]
        stats = fake.stats()
        assert stats["replayed"] == 1 and stats["duplicates"] == 0 and stats["unique_keys"] == 2
        assert stats["received"] == 3 and stats["delivered"] == 2


async def test_idempotency_holds_for_a_copy_sent_while_the_first_is_in_flight(
    start: Starter, http: aiohttp.ClientSession
) -> None:
    async with start(idempotency=True, latency="fixed:0.05") as fake:
        headers = {**AUTH, "Idempotency-Key": "job-1"}
        first, second = await asyncio.gather(
            send(http, fake, headers=headers), send(http, fake, headers=headers)
        )
        assert first == second and first[0] == 200
        assert len(fake.ledger) == 1 and fake.stats()["replayed"] == 1


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


@pytest.mark.parametrize("idempotency", [False, True])
async def test_a_malformed_answer_hides_an_accepted_message(
    start: Starter, http: aiohttp.ClientSession, idempotency: bool
) -> None:
    malformed = (parse_fault("malformed:1"),)
    async with start(faults=malformed, idempotency=idempotency) as fake:
        answers = [await post_raw(http, fake, key="job-1") for _ in range(2)]
        for status, content_type, body in answers:
            assert (status, content_type) == (200, "application/json")
            with pytest.raises(ValueError):
                json.loads(body)
        # One cut mid-JSON, one a proxy's HTML page.
        assert answers[0][2].startswith(b'{"id": "<') and answers[1][2].startswith(b"<html>")
        stats = fake.stats()
        assert stats["faults"] == {"malformed": 2} and stats["by_status"] == {"200": 2}
        if idempotency:  # the retry was answered, not delivered again
            assert len(fake.ledger) == 1 and stats["replayed"] == 1 and stats["duplicates"] == 0
        else:  # the message was sent twice: the duplicate the harness must find
            assert len(fake.ledger) == 2 and stats["duplicates"] == 1
        assert {entry.idempotency_key for entry in fake.ledger} == {"job-1"}


async def test_with_idempotency_a_retry_after_a_malformed_answer_reads_the_first_answer(
    start: Starter, http: aiohttp.ClientSession
) -> None:
    async with start(seed=3, faults=(parse_fault("malformed:0.5"),), idempotency=True) as fake:
        answers = [_json_or_none((await post_raw(http, fake, key="job-1"))[2]) for _ in range(20)]
        readable = [answer for answer in answers if answer is not None]
        [entry] = fake.ledger
        assert 0 < fake.stats()["faults"]["malformed"] < 20
        assert len(readable) == 20 - fake.stats()["faults"]["malformed"]
        assert {answer["id"] for answer in readable} == {entry.message_id}


async def test_a_malformed_fault_leaves_a_refused_send_alone(
    start: Starter, http: aiohttp.ClientSession
) -> None:
    async with start(faults=(parse_fault("malformed:1"),)) as fake:
        status, body = await send(http, fake, data={**SEND, "to": ""})
        assert status == 400 and "'to' parameter is missing" in body["message"]
        assert fake.stats()["faults"] == {"malformed": 0}


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


async def _outcome(http: aiohttp.ClientSession, fake: FakeMailgun) -> str:
    try:
        status, _, body = await post_raw(http, fake)
    except aiohttp.ClientConnectionError:
        return "reset"
    return "malformed" if _json_or_none(body) is None else str(status)


async def test_faults_follow_their_probability_and_the_seed(
    start: Starter, http: aiohttp.ClientSession
) -> None:
    kinds = ("503:0.3", "500:0.2", "reset:0.05", "malformed:0.1")
    faults = tuple(parse_fault(text) for text in kinds)
    runs = []
    for _ in range(2):
        async with start(seed=5, faults=faults) as fake:
            runs.append([await _outcome(http, fake) for _ in range(200)])
            assert fake.stats()["faults"] == {
                kind: runs[-1].count(kind) for kind in ("503", "500", "reset", "malformed")
            }
    assert runs[0] == runs[1]
    counts = {kind: runs[0].count(kind) for kind in ("200", "500", "503", "reset", "malformed")}
    assert sum(counts.values()) == 200
    assert 45 <= counts["503"] <= 80 and 30 <= counts["500"] <= 55
    assert 3 <= counts["reset"] <= 20 and 8 <= counts["malformed"] <= 35


@pytest.mark.parametrize(
    "text", ["503", "503:x", "503:1.5", "302:0.1", "boom:0.1", "reset:-1", "malformed:2", "hang:"]
)
def test_malformed_faults_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match=r"is not understood: .*malformed:PROB"):
        parse_fault(text)


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        (("503:0.6", "reset:0.6"), r"add up to 1\.2 \(503:0\.6 \+ reset:0\.6\)"),
        (("503:0.1", "500:0.1", "503:0.2"), "Fault 503 is given more than once"),
    ],
)
def test_fault_sets_that_cannot_be_drawn_are_refused(texts: tuple[str, ...], message: str) -> None:
    faults = tuple(parse_fault(text) for text in texts)
    with pytest.raises(ConfigError, match=message):
        FakegunSettings(faults=faults)


def test_fault_probabilities_may_add_up_to_exactly_one() -> None:
    faults = ("503:0.7", "malformed:0.2", "hang:0.1")
    assert len(FakegunSettings(faults=tuple(parse_fault(t) for t in faults)).faults) == 3


# -- the rate limit ---------------------------------------------------------------------


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_bucket_lets_a_burst_through_then_refills_at_the_rate() -> None:
    bucket = TokenBucket(RateLimit(rate=4, burst=3))
    assert [bucket.take(10.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(10.0) == pytest.approx(0.25)
    assert bucket.take(10.1) == pytest.approx(0.15)  # a refused send takes nothing
    assert bucket.take(10.26) == 0.0
    assert bucket.take(10.26) > 0.0
    # A long quiet spell saves up at most the burst.
    assert [bucket.take(100.0) for _ in range(4)][:3] == [0.0, 0.0, 0.0]
    assert bucket.take(100.0) > 0.0


async def test_a_rate_limited_send_gets_429_with_retry_after(
    start: Starter, http: aiohttp.ClientSession
) -> None:
    clock = ManualClock()
    async with start(rate_limit=RateLimit(rate=0.25, burst=2), clock=clock) as fake:
        wrong = {"Authorization": "Basic " + base64.b64encode(b"api:wrong").decode()}
        assert (await send(http, fake, headers=wrong))[0] == 401  # takes no token
        assert [(await send(http, fake))[0] for _ in range(2)] == [200, 200]

        async def limited() -> str:
            url = f"{fake.url}/v3/{DOMAIN}/messages"
            async with http.post(url, data=SEND, headers=AUTH) as response:
                assert response.status == 429
                assert set((await response.json()).keys()) == {"message"}
                return response.headers["Retry-After"]

        assert await limited() == "4"  # one token every 4 s
        clock.now += 2.5
        assert await limited() == "2"  # 1.5 s to go, rounded up
        clock.now += 1.4
        assert await limited() == "1"  # 0.1 s to go: at least 1
        clock.now += 0.2
        assert (await send(http, fake))[0] == 200
        stats = fake.stats()
        assert stats["rate_limited"] == 3 and stats["faults"] == {}
        assert stats["by_status"] == {"401": 1, "200": 3, "429": 3}
        assert len(fake.ledger) == 3


async def test_the_rate_limit_runs_on_the_event_loop_clock_and_reset_refills_it(
    start: Starter, http: aiohttp.ClientSession
) -> None:
    async with start(rate_limit=parse_rate_limit("0.001:2")) as fake:
        assert [(await send(http, fake))[0] for _ in range(3)] == [200, 200, 429]
        async with http.post(f"{fake.url}/v3/{DOMAIN}/messages", data=SEND, headers=AUTH) as r:
            assert r.status == 429 and int(r.headers["Retry-After"]) >= 900  # ~1000 s a token
        await admin(http, fake, "reset")
        assert [(await send(http, fake))[0] for _ in range(3)] == [200, 200, 429]


async def test_a_limited_send_still_draws_its_fault(
    start: Starter, http: aiohttp.ClientSession
) -> None:
    # The n-th send draws the same fault whether or not the limit turned it away.
    faults = (parse_fault("503:0.5"),)
    async with start(seed=9, faults=faults) as fake:
        free = [await _outcome(http, fake) for _ in range(12)]
    clock = ManualClock()
    async with start(seed=9, faults=faults, rate_limit=RateLimit(1, 1), clock=clock) as fake:
        limited = []
        for n in range(12):
            clock.now += 1.0 if n % 2 == 0 else 0.0  # every other send finds the bucket empty
            limited.append(await _outcome(http, fake))
    assert limited[1::2] == ["429"] * 6
    assert limited[0::2] == free[0::2]


@pytest.mark.parametrize(
    ("text", "rate", "burst"), [("300", 300, 300), ("300:50", 300, 50), ("0.5:1", 0.5, 1)]
)
def test_rate_limits_are_read(text: str, rate: float, burst: float) -> None:
    assert parse_rate_limit(text) == RateLimit(rate, burst)


@pytest.mark.parametrize("text", ["0", "-5", "x", "300:0", "300:0.5", "inf", "nan", "", "1:2:3"])
def test_rate_limits_that_make_no_sense_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match=r"Rate limit .* is not understood: use RATE\[:BURST\]"):
        parse_rate_limit(text)


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
    monkeypatch.setattr(servers.fakegun.validate, "MAX_MESSAGE_BYTES", text_size + len(PNG) - 1)
    assert (await send(EMAIL, "inline-2")).ok
    refused = await send(EMAIL, "inline-3", inline=[("chart.png", PNG)])
    assert (refused.outcome, refused.status) == (Outcome.PERMANENT, 400)
    assert "size" in refused.detail


@pytest.mark.parametrize(
    ("fault", "detail"),
    [
        ("reset:1", "connection error: "),
        ("hang:1", "timeout (ReadTimeout)"),
        ("503:1", "503: Injected fault 503"),
        ("malformed:1", "malformed response: 200 with body "),
    ],
)
async def test_the_client_retries_what_the_faults_do(
    start: Starter, client_send: Callable[..., ClientSend], fault: str, detail: str
) -> None:
    async with start(faults=(parse_fault(fault),)) as fake:
        result = await client_send(fake, timeout=0.3)(EMAIL, "job-1")
        assert result.outcome is Outcome.RETRYABLE and result.detail.startswith(detail)
        # Only the malformed answer hides a delivery.
        assert len(fake.ledger) == (1 if fault.startswith("malformed") else 0)


async def test_with_idempotency_the_clients_retry_settles_a_malformed_answer(
    start: Starter, client_send: Callable[..., ClientSend]
) -> None:
    async with start(seed=2, faults=(parse_fault("malformed:0.5"),), idempotency=True) as fake:
        send = client_send(fake)
        results = [await send(EMAIL, "job-1") for _ in range(8)]
        [entry] = fake.ledger
    outcomes = {result.outcome for result in results}
    assert outcomes == {Outcome.SUCCESS, Outcome.RETRYABLE}
    assert {r.message_id for r in results if r.ok} == {entry.message_id}


async def test_the_client_waits_as_the_rate_limit_says(
    start: Starter, client_send: Callable[..., ClientSend]
) -> None:
    async with start(rate_limit=parse_rate_limit("0.5:1")) as fake:
        send = client_send(fake)
        assert (await send(EMAIL, "job-1")).ok
        limited = await send(EMAIL, "job-2")
    assert (limited.outcome, limited.status) == (Outcome.RETRYABLE, 429)
    assert limited.retry_after is not None and 1 <= limited.retry_after <= 2


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
    argv = [word for option in options.items() for word in option] + ["--idempotency"]
    argv += ["--rate-limit", "300:50"]
    argv += ["--domain", "a.test", "--domain", "b.test"]
    argv += ["--fault", "503:0.01", "--fault", "reset:0.02"]
    args = parser.parse_args(argv)
    settings = settings_from_args(args)
    assert settings.domains == ("a.test", "b.test")
    assert [str(f) for f in settings.faults] == ["503:0.01", "reset:0.02"]
    assert (settings.latency, settings.seed, settings.idempotency, settings.api_key) == (
        "fixed:0.1",
        3,
        True,
        "k",
    )
    assert settings.rate_limit == RateLimit(300, 50)
    assert (defaults.idempotency, defaults.rate_limit, defaults.faults) == (False, None, ())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rate-limit", "0"], "Rate limit '0' is not understood"),
        (["--fault", "malformed:2"], "Fault 'malformed:2' is not understood"),
        (["--fault", "503:0.7", "--fault", "500:0.7"], "The fault probabilities add up to 1.4"),
    ],
)
def test_bad_options_are_one_clear_error(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Refused while reading the options, before any server starts.
    assert servers.fakegun.cli.main(["--port", "0", *argv]) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")


def test_the_server_announces_its_address_and_stops_on_sigterm() -> None:
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-m", "servers.fakegun.cli", "--port", "0", "--latency", "fixed:0.1"]
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
