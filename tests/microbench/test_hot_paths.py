"""The per-request hot paths: the form page, validation, the job codec, the fake's send.

Each body asserts its result, so in a plain test run (one unmeasured call) it is also a
test of the path it times.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Iterator

import aiohttp
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from queues.base import Email, Job, decode_job, encode_job
from servers.fakegun.server import FakegunSettings, FakeMailgun
from servers.metrics import Recorder
from servers.senders.threaded import ThreadedSender
from servers.web.forms import EmailForm, render_form, validate

FORM = {
    "to": "Reader.Name+tag@example.com",
    "subject": "Benchmark message 42",
    "message": "Hello from mailbench. " * 10,
}
JOB = Job(
    id=uuid.uuid4().hex,
    email=Email(to="reader42@example.com", subject="Benchmark message 42", text="Hello " * 40),
)


def test_render_form_with_an_error(benchmark: BenchmarkFixture) -> None:
    """The page a refused POST /send answers with (the GET page is rendered once)."""
    page = benchmark(render_form, FORM, "The subject must be a single line.")
    assert 'role="alert"' in page and "Reader.Name+tag@example.com" in page


def test_validate_form(benchmark: BenchmarkFixture) -> None:
    form = benchmark(validate, FORM)
    assert form == EmailForm(
        to="Reader.Name+tag@example.com", subject=FORM["subject"], message=FORM["message"]
    )


def test_encode_job(benchmark: BenchmarkFixture) -> None:
    assert decode_job(benchmark(encode_job, JOB)) == JOB


def test_decode_job(benchmark: BenchmarkFixture) -> None:
    assert benchmark(decode_job, encode_job(JOB)) == JOB


@pytest.fixture
def own_loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_fake_mailgun_send_to_ledger(
    benchmark: BenchmarkFixture, own_loop: asyncio.AbstractEventLoop
) -> None:
    """One send through the fake's app over loopback, from request to ledger entry and
    reply, with no modelled latency: the cost the fake adds to every API call."""
    loop = own_loop
    key = "key-bench"
    auth = {"Authorization": "Basic " + base64.b64encode(f"api:{key}".encode()).decode()}
    data = {"from": "bench@mailbench.test", "to": "ada@example.test", "subject": "Hi", "text": "x"}
    fake = FakeMailgun(FakegunSettings(latency="fixed:0", api_key=key, seed=1))
    loop.run_until_complete(fake.start())
    session = loop.run_until_complete(_session())
    url = f"{fake.url}/v3/mg.test/messages"

    async def send() -> int:
        headers = {**auth, "Idempotency-Key": uuid.uuid4().hex}
        async with session.post(url, data=data, headers=headers) as response:
            await response.read()
            return response.status

    try:
        assert benchmark(lambda: loop.run_until_complete(send())) == 200
        stats = fake.stats()
        assert stats["accepted"] == stats["unique_keys"] >= 1
    finally:
        loop.run_until_complete(session.close())
        loop.run_until_complete(fake.stop())


async def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession()  # made inside the loop it will run in


class _NoEnqueue(ThreadedSender):
    """A framework sender whose blocking enqueue does nothing: what is left is the hop."""

    def enqueue(self, job: Job) -> None:
        assert job is JOB


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    event_loop = asyncio.new_event_loop()
    yield event_loop
    event_loop.close()


def test_the_thread_hop_of_a_blocking_framework_enqueue(
    benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop
) -> None:
    """Celery, RQ, Dramatiq and huey have no async enqueue: the handler runs theirs in a
    thread pool. This is that hop, to the thread and back, with an enqueue that does
    nothing (compare ``test_an_awaited_no_op``: the loop's own round)."""
    sender = _NoEnqueue(Recorder())
    handed = benchmark(lambda: loop.run_until_complete(sender.hand(JOB)))
    assert handed.accepted
    loop.run_until_complete(sender.aclose())


def test_an_awaited_no_op(benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop) -> None:
    """The event loop's own round trip for one coroutine, the baseline of the hop."""

    async def no_op() -> bool:
        return True

    assert benchmark(lambda: loop.run_until_complete(no_op()))
