"""The per-email card renderer, and its hooks in the server (direct, blocking) and worker.

Calibration is tested with a synthetic cost model (chosen parameters, never wall-clock
times); the renders themselves are real Pillow work throughout.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import re
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from harness.errors import ConfigError
from queues import open_queue
from queues.base import Email, Job
from queues.memory import MemoryQueue
from servers.mailgun import MailgunSettings, Outcome, SendResult
from servers.metrics import decode
from servers.render import (
    CARD_FILENAME,
    CARD_SIZE,
    MAX_CANVAS_PIXELS,
    MAX_LEVEL,
    MIN_LEVEL,
    Calibration,
    Renderer,
    RenderParams,
    calibrate,
    recipient_name,
    render_card,
)
from servers.web.app import ServerSettings, create_app
from servers.web.app import add_cli_arguments as add_server_arguments
from servers.worker import Worker, WorkerSettings
from servers.worker import add_cli_arguments as add_worker_arguments

ADA = Email(to="ada@example.com", subject="Your weekly report", text="Hi")


def decode_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def linear_cost(fixed: float = 0.002, per_pixel_pass: float = 1e-7) -> Callable[..., float]:
    """A deterministic stand-in for timing a render: fixed cost plus work."""

    def measure(params: RenderParams) -> float:
        return fixed + per_pixel_pass * params.work

    return measure


def fixed_cost(seconds: float) -> Callable[[RenderParams], float]:
    return lambda _params: seconds


# --- the card ---------------------------------------------------------------------------


def test_card_is_a_png_greeting_the_recipient_by_name() -> None:
    png = render_card(ADA, RenderParams(320, 180, 1))
    image = decode_png(png)
    assert image.format == "PNG"
    assert image.mode == "P"  # a palette image: small enough to attach
    assert image.size == (320, 180)
    assert image.info["Title"] == "Hello, ada!"
    assert image.info["Description"] == "Your weekly report"


def test_cards_differ_per_recipient() -> None:
    params = RenderParams(160, 90, 1)
    ada = decode_png(render_card(ADA, params)).convert("RGB")
    bob = decode_png(render_card(Email("bob@example.com", ADA.subject, "Hi"), params))
    assert bob.info["Title"] == "Hello, bob!"
    assert ada.tobytes() != bob.convert("RGB").tobytes()


def test_a_large_canvas_is_downscaled_to_a_small_attachment() -> None:
    png = render_card(ADA, RenderParams(1280, 720, 2))
    assert decode_png(png).size == CARD_SIZE
    assert len(png) <= 50_000


def test_recipient_name_is_the_local_part() -> None:
    assert recipient_name("ada.lovelace@example.com") == "ada.lovelace"
    assert recipient_name("no-at-sign") == "no-at-sign"


def test_work_grows_with_the_level_canvas_first_then_passes() -> None:
    levels = [MIN_LEVEL, 0.5, 1.0, 4.0, 30.0, 100.0, 1000.0]
    params = [RenderParams.at_level(level) for level in levels]
    works = [p.work for p in params]
    assert works == sorted(works) and len(set(works)) == len(works)
    assert params[2] == RenderParams(320, 180, 1)
    assert all(p.width * p.height <= MAX_CANVAS_PIXELS * 1.01 for p in params)
    assert params[-1].passes > params[-2].passes > 1
    assert RenderParams.at_level(0.0) == RenderParams.at_level(MIN_LEVEL)
    assert RenderParams.at_level(1e12) == RenderParams.at_level(MAX_LEVEL)


# --- calibration ------------------------------------------------------------------------


def test_calibration_picks_more_work_for_a_larger_target() -> None:
    measure = linear_cost()
    chosen = [calibrate(target, measure, measure) for target in (5.0, 20.0, 50.0, 500.0)]
    works = [c.params.work for c in chosen]
    assert works == sorted(works) and len(set(works)) == len(works)
    assert chosen[-1].params.passes > 1  # past full HD, the passes grow
    for c in chosen:
        assert c.median_ms == pytest.approx(c.target_ms, rel=0.10)
        assert c.note == ""


def test_calibration_reports_the_check_not_the_probes() -> None:
    calibration = calibrate(20.0, linear_cost(), fixed_cost(0.0213))
    assert calibration.median_ms == pytest.approx(21.3)
    assert calibration.probes >= 2
    assert calibration.as_dict()["params"] == {
        "width": calibration.params.width,
        "height": calibration.params.height,
        "passes": calibration.params.passes,
    }


def test_calibration_converges_despite_noise() -> None:
    # ±15% timing noise, deterministic: the fit over all probes still lands near.
    noise = iter([1.15, 0.85, 1.1, 0.9, 1.05, 0.95, 1.0, 1.0, 1.0])
    base = linear_cost()

    def noisy(params: RenderParams) -> float:
        return base(params) * next(noise)

    calibration = calibrate(30.0, noisy, base)
    assert calibration.median_ms == pytest.approx(30.0, rel=0.2)


def test_a_target_below_the_cheapest_render_says_so() -> None:
    calibration = calibrate(1.0, fixed_cost(0.004), fixed_cost(0.004))
    assert calibration.params == RenderParams.at_level(MIN_LEVEL)
    assert "cheapest render takes 4.0 ms" in calibration.note
    assert "cheapest render" in calibration.describe()


def test_a_target_beyond_the_largest_render_is_capped() -> None:
    calibration = calibrate(1e9, linear_cost(), linear_cost())
    assert calibration.params == RenderParams.at_level(MAX_LEVEL)
    assert "capped" in calibration.note


def test_real_calibration_renders_a_card() -> None:
    renderer = Renderer(5.0)
    assert renderer.enabled and renderer.calibration is not None
    assert renderer.calibration.median_ms > 0
    [(filename, png)] = renderer.inline(ADA)
    assert filename == CARD_FILENAME
    assert decode_png(png).info["Title"] == "Hello, ada!"


def test_real_calibration_does_more_work_for_a_larger_target() -> None:
    # CPU time per render, and targets 15× apart: not a wall-clock race.
    small, large = Renderer(2.0), Renderer(30.0)
    assert small.calibration is not None and large.calibration is not None
    assert large.calibration.params.work > small.calibration.params.work


# --- the renderer, on and off -----------------------------------------------------------


def test_zero_means_no_render_and_no_attachment() -> None:
    def never(_params: RenderParams) -> float:
        raise AssertionError("a renderer that is off must not calibrate")

    renderer = Renderer(0.0, measure=never, check=never)
    assert not renderer.enabled
    assert renderer.inline(ADA) == []
    assert renderer.describe() is None
    with pytest.raises(ConfigError, match="off"):
        renderer.render(ADA)


@pytest.mark.parametrize("target", [-1.0, float("nan"), float("inf")])
def test_a_nonsense_target_is_refused(target: float) -> None:
    with pytest.raises(ConfigError, match="render cost"):
        Renderer(target)


def quick_renderer(target_ms: float = 5.0) -> Renderer:
    """A real renderer whose calibration is told the cost instead of timing it."""
    cost = fixed_cost(target_ms / 1000)
    return Renderer(target_ms, measure=cost, check=cost)


def test_renderer_describes_its_calibration_for_metrics() -> None:
    renderer = quick_renderer(5.0)
    described = renderer.describe()
    assert described is not None
    assert described["target_ms"] == 5.0 and described["median_ms"] == 5.0
    assert isinstance(renderer.calibration, Calibration)
    assert renderer.calibration.params == RenderParams.at_level(1.0)


# --- the server hook: direct and blocking modes -----------------------------------------


@dataclass
class Captured:
    """What a stub Mailgun API received: text fields and inline files per send."""

    sends: list[tuple[dict[str, str], list[tuple[str, str, bytes]]]] = field(default_factory=list)


@pytest.fixture
def stub_api() -> Iterator[tuple[str, Captured]]:
    # In its own thread and loop: the blocking mode stalls the test's loop on purpose.
    captured = Captured()

    async def messages(request: web.Request) -> web.Response:
        fields: dict[str, str] = {}
        files: list[tuple[str, str, bytes]] = []
        for name, value in (await request.post()).items():
            if isinstance(value, web.FileField):
                files.append((name, value.filename, value.file.read()))
            else:
                fields[name] = str(value)
        captured.sends.append((fields, files))
        return web.json_response({"id": "<1@mailbench.test>", "message": "Queued. Thank you."})

    app = web.Application()
    app.router.add_post("/v3/{domain}/messages", messages)
    runner = web.AppRunner(app)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(runner.setup(), loop).result(10)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    asyncio.run_coroutine_threadsafe(site.start(), loop).result(10)
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", captured
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


Client = TestClient[web.Request, web.Application]
Serve = Callable[[ServerSettings], Awaitable[Client]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Starts the reference app in-process; closes every app it started."""
    clients: list[Client] = []

    async def start(settings: ServerSettings) -> Client:
        client = TestClient(TestServer(create_app(settings)))
        await client.start_server()
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()


async def post_form(client: Client, to: str = "ada@example.com") -> dict[str, object]:
    """POST /send as a browser would: with the form's CSRF token when the page has one."""
    page = await (await client.get("/")).text()
    form = {"to": to, "subject": "Your weekly report", "message": "Hi"}
    token = re.search(r'name="csrf_token"[^>]*?value="([^"]*)"', page)
    if token:
        form["csrf_token"] = token.group(1)
    response = await client.post("/send", data=form, headers={"Accept": "application/json"})
    body: dict[str, object] = await response.json()
    assert response.status == 200, body
    return body


@pytest.mark.parametrize("mode", ["direct", "blocking"])
async def test_server_renders_in_the_request_and_sends_the_card_inline(
    mode: str,
    stub_api: tuple[str, Captured],
    serve: Serve,
) -> None:
    url, captured = stub_api
    settings = ServerSettings(mode=mode, mailgun=MailgunSettings(base_url=url), render_ms=3.0)
    client = await serve(settings)
    await post_form(client, to="grace@example.com")
    [(fields, files)] = captured.sends
    assert fields["to"] == "grace@example.com"
    [(part, filename, png)] = files
    assert (part, filename) == ("inline", CARD_FILENAME)
    image = decode_png(png)
    assert image.format == "PNG" and image.info["Title"] == "Hello, grace!"
    metrics = await (await client.get("/_mailbench/metrics")).json()
    assert decode(metrics["histograms"]["render"]).get_total_count() == 1
    assert decode(metrics["histograms"]["api"]).get_total_count() == 1
    assert metrics["render"]["target_ms"] == 3.0


async def test_server_without_render_cost_sends_no_attachment(
    stub_api: tuple[str, Captured], serve: Serve
) -> None:
    url, captured = stub_api
    client = await serve(ServerSettings(mode="direct", mailgun=MailgunSettings(base_url=url)))
    await post_form(client)
    [(fields, files)] = captured.sends
    assert fields["to"] == "ada@example.com" and files == []
    metrics = await (await client.get("/_mailbench/metrics")).json()
    assert "render" not in metrics["histograms"]
    assert "render" not in metrics


def test_serve_takes_the_render_cost_from_the_command_line() -> None:
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    assert parser.parse_args(["--mode", "direct", "--render-ms", "20"]).render_ms == 20.0
    assert parser.parse_args(["--mode", "direct"]).render_ms == 0.0


# --- the worker hook --------------------------------------------------------------------


class RecordingSender:
    """A stand-in for the Mailgun client: accepts every email, keeps what it was sent."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Email, list[tuple[str, bytes]]]] = []

    async def send(
        self, email: Email, idempotency_key: str, *, inline: Sequence[tuple[str, bytes]] = ()
    ) -> SendResult:
        self.calls.append((idempotency_key, email, list(inline)))
        return SendResult(Outcome.SUCCESS, 200, message_id="<1@mailbench.test>")


class FlakyRenderer(Renderer):
    """A real renderer whose first ``failures`` renders raise."""

    def __init__(self, failures: int) -> None:
        cost = fixed_cost(0.005)
        super().__init__(5.0, measure=cost, check=cost)
        self.failures = failures
        self.attempts = 0

    def render(self, email: Email) -> bytes:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise RuntimeError("out of fonts")
        return super().render(email)


@pytest.fixture
async def memory_queue() -> AsyncIterator[tuple[str, MemoryQueue]]:
    url = f"memory://{uuid.uuid4().hex}"
    queue = await open_queue(url)
    assert isinstance(queue, MemoryQueue)
    yield url, queue
    await queue.close()


def worker_settings(url: str, **overrides: object) -> WorkerSettings:
    values: dict[str, object] = {
        "backend": url,
        "concurrency": 4,
        "backoff_base": 0.001,
        "backoff_cap": 0.002,
        "drain_timeout": 2.0,
        "render_ms": 5.0,
    }
    values.update(overrides)
    return WorkerSettings(**values)  # type: ignore[arg-type]


async def run_until(worker: Worker, done: Callable[[], bool], timeout: float = 10.0) -> None:
    task = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(timeout):
            while not done():
                await asyncio.sleep(0.005)
    finally:
        await worker.stop()
        await task


async def test_worker_renders_and_sends_the_card_inline(
    memory_queue: tuple[str, MemoryQueue],
) -> None:
    url, queue = memory_queue
    job = Job(id=uuid.uuid4().hex, email=Email("lin@example.com", "Receipt", "Thanks"))
    await queue.enqueue(job)
    sender = RecordingSender()
    worker = Worker(worker_settings(url), queue, sender, renderer=quick_renderer())
    await run_until(worker, lambda: worker.acked == 1)
    [(key, email, inline)] = sender.calls
    assert (key, email) == (job.id, job.email)
    [(filename, png)] = inline
    assert filename == CARD_FILENAME
    assert decode_png(png).info["Title"] == "Hello, lin!"
    assert worker.recorder.histograms["render"].get_total_count() == 1
    assert worker.snapshot()["render"] == worker.renderer.describe()
    assert await queue.depth() == 0


async def test_worker_without_render_cost_sends_no_attachment(
    memory_queue: tuple[str, MemoryQueue],
) -> None:
    url, queue = memory_queue
    await queue.enqueue(Job(id=uuid.uuid4().hex, email=ADA))
    sender = RecordingSender()
    worker = Worker(worker_settings(url, render_ms=0.0), queue, sender)
    await run_until(worker, lambda: worker.acked == 1)
    assert [inline for *_, inline in sender.calls] == [[]]
    assert "render" not in worker.recorder.histograms
    assert "render" not in worker.snapshot()


async def test_a_failed_render_is_retried_not_lost(memory_queue: tuple[str, MemoryQueue]) -> None:
    url, queue = memory_queue
    job = Job(id=uuid.uuid4().hex, email=ADA)
    await queue.enqueue(job)
    sender = RecordingSender()
    worker = Worker(worker_settings(url), queue, sender, renderer=FlakyRenderer(failures=1))
    await run_until(worker, lambda: worker.acked == 1)
    assert worker.retried == 1
    assert worker.errors == {"render RuntimeError": 1}
    [(key, _email, inline)] = sender.calls  # sent once, after the render that worked
    assert key == job.id and [name for name, _ in inline] == [CARD_FILENAME]
    assert worker.dead_lettered == [] and await queue.depth() == 0


async def test_a_render_that_always_fails_ends_in_the_dead_letter(
    memory_queue: tuple[str, MemoryQueue],
) -> None:
    url, queue = memory_queue
    job = Job(id=uuid.uuid4().hex, email=ADA)
    await queue.enqueue(job)
    sender = RecordingSender()
    renderer = FlakyRenderer(failures=1_000)
    worker = Worker(worker_settings(url, max_attempts=3), queue, sender, renderer=renderer)
    await run_until(worker, lambda: len(worker.dead_lettered) == 1)
    [(dead_id, reason)] = worker.dead_lettered
    assert dead_id == job.id
    assert reason.startswith("gave up after 3 attempts: render failed")
    assert [dead.job for dead in queue.dead_lettered()] == [job.next_attempt().next_attempt()]
    assert renderer.attempts == 3 and sender.calls == []
    assert await queue.depth() == 0


def test_worker_takes_the_render_cost_from_the_command_line() -> None:
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    args = parser.parse_args(["--backend", "memory://x", "--render-ms", "20"])
    assert args.render_ms == 20.0
    assert parser.parse_args(["--backend", "memory://x"]).render_ms == 0.0
