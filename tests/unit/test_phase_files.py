"""Figures by phase of the run: the recorder, the control file, the files per phase."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from servers.metrics import decode
from servers.phases import (
    MAIN,
    PhasedRecorder,
    PhaseFile,
    read_control,
    write_control,
    write_phases,
)
from servers.web.app import ServerSettings, create_app


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def counts(recorder: PhasedRecorder) -> dict[str, int]:
    return {
        p.folder: sum(int(h.get_total_count()) for h in p.histograms.values())
        for p in recorder.phases
    }


def test_a_value_goes_to_the_phase_its_operation_began_in() -> None:
    clock = Clock(100.0)
    recorder = PhasedRecorder(clock)
    recorder.set_phases([("warmup", None), (MAIN, 103.0), ("sweep/step-00", 130.0)])
    clock.now = 103.5
    recorder.record("api", 0.75)  # began at 102.75, in the warm-up
    recorder.record("api", 0.25)  # began at 103.25, after it
    clock.now = 131.0
    recorder.record("queue_wait", 29.0)  # a job accepted at 102.0
    recorder.record("api", 0.5)
    assert counts(recorder) == {"warmup": 2, MAIN: 1, "sweep/step-00": 1}
    assert recorder.current == "sweep/step-00"
    assert set(recorder.histograms) == {"api"}  # the current phase's


def test_without_phases_it_is_a_plain_recorder() -> None:
    recorder = PhasedRecorder(Clock(0.0))
    recorder.record("api", 0.5)
    assert counts(recorder) == {MAIN: 1}
    assert decode(recorder.encoded()["api"]).get_total_count() == 1


def test_phases_named_again_keep_what_they_recorded() -> None:
    clock = Clock(10.0)
    recorder = PhasedRecorder(clock)
    recorder.set_phases([("warmup", None)])
    recorder.record("api", 0.1)
    recorder.set_phases([("warmup", None), (MAIN, 11.0)])
    assert counts(recorder) == {"warmup": 1, MAIN: 0}


def test_files_per_phase_beside_the_metrics_file(tmp_path: Path) -> None:
    clock = Clock(100.0)
    recorder = PhasedRecorder(clock)
    recorder.set_phases([("warmup", None), (MAIN, 101.0), ("sweep/step-00", 110.0)])
    recorder.record("api", 0.1)
    clock.now = 105.0
    recorder.record("api", 0.1)
    recorder.record("api", 0.2)
    out = tmp_path / "worker-0.json"
    write_phases(out, recorder, {"acked": 3, "histograms": "replaced"})
    main = json.loads(out.read_text())
    assert main["acked"] == 3 and main["phase"] == MAIN and main["begins_at"] == 101.0
    assert decode(main["histograms"]["api"]).get_total_count() == 2
    warmup = json.loads((tmp_path / "warmup" / "worker-0.json").read_text())
    assert "acked" not in warmup  # counts are the process's, kept with the main phase
    assert warmup["begins_at"] is None
    assert decode(warmup["histograms"]["api"]).get_total_count() == 1
    step = json.loads((tmp_path / "sweep" / "step-00" / "worker-0.json").read_text())
    assert step["histograms"] == {}


def test_the_control_file_is_followed_when_it_changes(tmp_path: Path) -> None:
    control = tmp_path / "phases.json"
    recorder = PhasedRecorder()
    follower = PhaseFile(control, recorder)
    follower.check()  # no file yet: the main phase
    assert recorder.current == MAIN
    write_control(control, [("warmup", None)])
    follower.check()
    assert recorder.current == "warmup"
    write_control(control, [("warmup", None), (MAIN, 5.0)])
    follower.check()
    assert recorder.current == MAIN
    assert read_control(control) == [("warmup", None), (MAIN, 5.0)]
    control.write_text("{not json")
    follower.check()  # a file that does not parse changes nothing
    assert recorder.current == MAIN


async def send_one(client: TestClient[Any, Any]) -> None:
    page = await client.get("/")
    token = (await page.text()).split('name="csrf_token" value="')[1].split('"')[0]
    sent = await client.post(
        "/send",
        data={"to": "a@example.com", "subject": "hi", "message": "m", "csrf_token": token},
        headers={"Accept": "application/json"},
    )
    assert sent.status == 202, await sent.text()


async def test_the_server_reports_its_first_request_and_keeps_figures_per_phase(
    tmp_path: Path,
) -> None:
    control, out = tmp_path / "phases.json", tmp_path / "server-0.json"
    write_control(control, [("warmup", None)])
    settings = ServerSettings(
        mode="redis", queue_url=f"memory://{uuid.uuid4().hex}", csrf_secret="s" * 32,
        metrics_out=out, phase_file=control,
    )  # fmt: skip
    async with TestClient(TestServer(create_app(settings))) as client:
        phase = await (await client.get("/_mailbench/phase")).json()
        assert phase == {"phase": "warmup", "first_request_at": None}
        before = time.time()
        await send_one(client)  # the load's first request, in the warm-up
        phase = await (await client.get("/_mailbench/phase")).json()
        assert before <= phase["first_request_at"] <= time.time()
        write_control(control, [("warmup", None), (MAIN, time.time())])
        deadline = time.monotonic() + 5
        while (await (await client.get("/_mailbench/phase")).json())["phase"] != MAIN:
            assert time.monotonic() < deadline, "the server did not follow the control file"
            await asyncio.sleep(0.02)
        await send_one(client)
        await send_one(client)

    def enqueued(path: Path) -> int:
        histograms = json.loads(path.read_text())["histograms"]
        return int(decode(histograms["enqueue"]).get_total_count())

    assert enqueued(tmp_path / "warmup" / "server-0.json") == 1
    assert enqueued(out) == 2
    assert json.loads(out.read_text())["accepted"] == 3  # counts are its whole life's
