"""The calibration server holds each case as long as it says, and ``mailbench calibrate``
compares what the generator measured with that truth."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from harness.report.calibration import table, verdicts
from harness.results.calibration import Measurement, stall_truth_us
from servers.calibration import CalibrationSettings, create_app, hold_until
from servers.metrics import decode

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    settings = CalibrationSettings(stall_s=0.2, stall_every_s=0.4, identity="token-7")
    async with TestClient(TestServer(create_app(settings))) as started:
        yield started


async def test_a_case_is_a_form_page_held_as_long_as_its_name_says(client: Client) -> None:
    began = time.monotonic()
    response = await client.get("/calibrate/10ms")
    assert response.status == 200 and b"<form" in await response.read()
    assert time.monotonic() - began >= 0.010
    stats = await (await client.get("/_mailbench/stats")).json()
    assert stats["identity"] == "token-7"
    held = decode(stats["held"]["10ms"])
    assert held.get_total_count() == 1 and held.get_min_value() >= 10_000
    assert (await client.get("/calibrate/fast")).status == 404


async def test_the_stall_stops_every_request_then_reset_forgets_it(client: Client) -> None:
    assert (await client.get("/calibrate/stall")).status == 200  # starts the stall clock
    await asyncio.sleep(0.25)  # the first stall is due half a period (0.2 s) later
    began = time.monotonic()
    # Both wait out the same stall: the loop is stopped, not one request.
    await asyncio.gather(client.get("/calibrate/stall"), client.get("/calibrate/0ms"))
    assert time.monotonic() - began >= 0.2
    stats = await (await client.get("/_mailbench/stats")).json()
    [(start, end)] = stats["stalls"]
    assert end - start >= 0.2
    assert (await client.post("/_mailbench/reset")).status == 200
    stats = await (await client.get("/_mailbench/stats")).json()
    assert stats["stalls"] == [] and stats["held"] == {}


async def test_hold_until_never_returns_early() -> None:
    for wait in (0.0, 0.0005, 0.003):
        deadline = time.monotonic() + wait
        await hold_until(deadline)
        assert time.monotonic() >= deadline


def test_the_truth_of_a_stall_is_what_a_random_arrival_waits() -> None:
    # Two stalls of 1.4 s in 9 s: P(wait > x) = 2·(1.4 − x)/9.
    truth = stall_truth_us([(2.5, 3.9), (7.5, 8.9)], (1.0, 10.0))
    assert truth[50.0] == 0.0
    assert truth[99.0] == pytest.approx(1_355_000, abs=1)
    assert truth[99.9] == pytest.approx(1_395_500, abs=1)
    # A stall outside the window counts for nothing, one cut by its edge for its part.
    assert stall_truth_us([(20.0, 21.4)], (1.0, 10.0)) == dict.fromkeys(truth, 0.0)
    # 0.7 s inside: the arrivals of its first 0.09 s (1% of 9 s) wait 1.31 s or more.
    cut = stall_truth_us([(9.3, 10.7)], (1.0, 10.0))
    assert cut[99.0] == pytest.approx(1_310_000, abs=1)
    assert cut[50.0] == 0.0


def row(case: str, model: str, measured: float, truth: float) -> Measurement:
    values = dict.fromkeys((50.0, 99.0, 99.9), 0.0)
    return Measurement(
        case=case,
        model=model,
        metric="form",
        samples=1000,
        errors=0,
        measured_us={p: measured + v for p, v in values.items()},
        truth_us=dict.fromkeys(values, truth),
        held_us=dict.fromkeys(values, truth),
    )


def test_the_table_sets_each_case_against_the_floor() -> None:
    rows = [
        row("0ms", "closed", 200, 0),  # the floor: 200 µs
        row("10ms", "closed", 10_230, 10_000),  # 30 µs above it
        row("500ms", "closed", 500_400, 500_000),  # 200 µs above it
    ]
    text = table(rows)
    assert "| 10ms | closed | 1,000 | 10 ms |" in text
    assert "| +30 µs | +30 µs |" in text
    said = verdicts(rows)
    assert (
        said[0]
        == "floor (closed): the generator adds 200 µs at p50, 200 µs at p99, 200 µs at p99.9"
    )
    assert said[1].startswith("10ms, closed: error above the floor +30 µs at p50") and said[
        1
    ].endswith(" met")
    assert said[2].endswith("NOT met")


def test_the_stall_verdicts_say_how_far_from_the_truth() -> None:
    truth = stall_truth_us([(5.0, 6.4)], (1.0, 10.0))
    open_model = Measurement("stall", "open", "form_intended", 1800, 0, dict(truth), truth, {}, 1)
    closed = Measurement(
        "stall",
        "closed",
        "form",
        1500,
        0,
        {50.0: 300, 99.0: 300_000, 99.9: 1_290_000},
        truth,
        {},
        1,
    )
    said = verdicts([open_model, closed])
    assert said[0].startswith("stall, open model from intended start: p99.9 1,391 ms")
    assert said[0].endswith("(+0.0%) — target within 5% met")
    assert said[1].startswith("stall, closed: p99 300 ms against a truth of 1,310 ms (-77%)")
