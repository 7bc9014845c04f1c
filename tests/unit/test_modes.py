"""Every registered mode is known to every consumer, and a new entry is all a mode needs.

The registry (:mod:`servers.modes`) is the one place that names the modes; the server,
the run, chaos, the report, the charts and the gate ask it. These tests go through each
consumer for each entry, then add an entry that no code knows by name and see every
consumer take it.
"""

from __future__ import annotations

import argparse
import importlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from harness.cli import COMMANDS
from harness.report import markdown
from harness.report.charts import mode_colour, mode_linestyle
from harness.results.folder import Run
from harness.run import chaos
from harness.run.cli import QueueUrls
from harness.run.config import DEFAULT_MODES, RunConfig
from harness.services.brokers import BROKERS
from harness.services.settings import SERVICE_NAMES
from queues.memory import open_memory
from servers import modes
from servers.modes import MODES, Kind, Mode, parse_modes
from servers.web.app import ServerSettings, add_cli_arguments, create_app

OKABE_ITO = {"#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7",
             "#999999", "#000000"}  # fmt: skip
# Paul Tol's colour-blind-safe "muted" scheme, for the framework modes.
TOL_MUTED = {"#CC6677", "#332288", "#DDCC77", "#117733", "#88CCEE", "#882255", "#44AA99",
             "#999933", "#AA4499"}  # fmt: skip


class FakeServices:
    """Stands in for harness.services.Services: hands out a URL per broker name."""

    def __init__(self) -> None:
        self.started: list[str] = []

    def start(self, name: str) -> str:
        self.started.append(name)
        return f"{name}://127.0.0.1/"


@pytest.mark.parametrize("name", list(MODES))
def test_every_mode_is_complete_and_its_code_exists(name: str) -> None:
    mode = MODES[name]
    module_name, _, class_name = mode.sender.partition(":")
    sender = getattr(importlib.import_module(module_name), class_name)
    assert callable(sender.open) and callable(sender.hand) and callable(sender.aclose)
    assert mode.title and mode.explanation.startswith("POST /send")
    if mode.queued:
        assert mode.worker in COMMANDS  # a mailbench subcommand runs its workers
        assert (mode.service in BROKERS and mode.service in SERVICE_NAMES) or (
            mode.queue_file is not None and "{dir}" in mode.queue_file
        )
    else:
        assert mode.worker is None and mode.service is None and mode.lease_parameter is None


def test_every_mode_but_the_opt_in_ones_runs_by_default_and_is_accepted_everywhere() -> None:
    by_default = (n for n, m in MODES.items() if m.by_default and not m.framework)
    assert tuple(n for n in by_default if not MODES[n].shortcut) == DEFAULT_MODES
    assert "sqs" not in DEFAULT_MODES and not MODES["sqs"].by_default  # moto is not SQS
    assert parse_modes(",".join(MODES)) == tuple(MODES)
    frameworks = tuple(n for n, m in MODES.items() if m.framework is not None)
    assert frameworks and parse_modes("frameworks,redis") == (*frameworks, "redis")
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    for name in MODES:
        assert parser.parse_args(["--mode", name]).mode == name


def test_every_mode_has_its_own_colour_and_in_request_modes_their_own_line() -> None:
    """A framework's two configurations share a colour: solid for reliable, dash-dotted
    for its default; every other mode has a colour of its own."""
    looks = [(mode_colour(name), mode_linestyle(name)) for name in MODES]
    assert len(set(looks)) == len(looks)
    for name, mode in MODES.items():
        if mode.framework is None:
            assert mode.colour in OKABE_ITO
            assert (mode_linestyle(name) == "-") == mode.sends_after_reply
        else:
            assert mode.colour in TOL_MUTED
            assert mode_linestyle(name) == ("-" if mode.config == "reliable" else "-.")
    reference = [m.colour for m in MODES.values() if m.framework is None]
    assert len(set(reference)) == len(reference)


@pytest.mark.parametrize("name", list(MODES))
def test_the_report_explains_every_mode(name: str, tmp_path: Path) -> None:
    run = Run(tmp_path, {}, [], [], [], {})  # a folder with no --target
    assert markdown._explain_mode(run, name) == MODES[name].explanation


def test_queue_urls_come_from_the_registry(tmp_path: Path) -> None:
    services = FakeServices()
    urls = QueueUrls(services, tmp_path, strict=True)  # type: ignore[arg-type]
    for name, mode in MODES.items():
        if not mode.queued:
            continue
        url = urls(name)
        assert url is not None
        if mode.service is not None:
            assert url == f"{mode.service}://127.0.0.1/"
        else:
            assert str((tmp_path / "queue").resolve()) in url
    assert services.started == [m.service for m in MODES.values() if m.service]


def breaker() -> chaos.Chaos:
    return chaos.Chaos(chaos.ChaosSettings(), RunConfig(), FakeServices())  # type: ignore[arg-type]


@pytest.mark.parametrize("name", [n for n, m in MODES.items() if m.queued])
def test_chaos_shortens_the_lease_the_registry_names(name: str) -> None:
    url = breaker().queue_url("x://h/?a=1", name)
    parameter = MODES[name].lease_parameter
    expected = "x://h/?a=1" if parameter is None else f"x://h/?a=1&{parameter}=10"
    assert url == expected


@pytest.fixture
def extra_mode(monkeypatch: pytest.MonkeyPatch) -> Iterator[Mode]:
    """A mode no code knows by name: a queued mode on the in-memory backend."""
    mode = Mode(
        "memory-test",
        Kind.QUEUED,
        "servers.senders.queued:QueuedSender",
        title="an in-process queue",
        explanation="POST /send appends the job to a list in the server's memory.",
        colour="#F0E442",
        queue_file="memory://{dir}",
        worker="worker",
        lease_parameter="lease",
    )
    monkeypatch.setitem(MODES, mode.name, mode)
    monkeypatch.setattr(modes, "QUEUED", (*modes.QUEUED, mode.name))
    yield mode


async def test_a_new_entry_is_served_run_charted_reported_and_broken(
    extra_mode: Mode, tmp_path: Path
) -> None:
    """Negative control for the checks above: one entry, and every consumer knows it."""
    assert parse_modes(f"direct,{extra_mode.name}") == ("direct", extra_mode.name)
    assert mode_colour(extra_mode.name) == "#F0E442"
    assert mode_linestyle(extra_mode.name) == "-"
    run = Run(tmp_path, {}, [], [], [], {})
    assert markdown._explain_mode(run, extra_mode.name) == extra_mode.explanation
    url = breaker().queue_url("memory://x", extra_mode.name)
    assert url == "memory://x?lease=10"
    queue_url = QueueUrls(FakeServices(), tmp_path, strict=True)(extra_mode.name)  # type: ignore[arg-type]
    assert queue_url is not None and queue_url.startswith("memory://")

    space = f"memory://{uuid.uuid4().hex}"
    settings = ServerSettings(mode=extra_mode.name, queue_url=space, csrf_secret="s" * 32)
    async with TestClient(TestServer(create_app(settings))) as client:
        page = await client.get("/")
        token = (await page.text()).split('name="csrf_token" value="')[1].split('"')[0]
        sent = await client.post(
            "/send",
            data={"to": "a@example.com", "subject": "hi", "message": "m", "csrf_token": token},
            headers={"Accept": "application/json"},
        )
        assert sent.status == 202, await sent.text()
        depth = await client.get("/_mailbench/depth")
        assert (await depth.json())["depth"] == 1
    queue = await open_memory(space, "mailbench")
    assert await queue.depth() == 1
