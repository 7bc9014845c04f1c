"""Coordinated omission, complete: an open-model load against a mode that cannot keep up
(``blocking``: one 0.2 s API call at a time, so at most 5 visits a second), where most
visits wait, are dropped or are still unanswered when the load stops. Their times from
intended start are recorded too, so the overloaded run never looks better."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.process import Children, free_port, mailbench_command
from harness.results.collect import read_locust
from harness.run.config import SCENARIOS_DIR
from servers.metrics import Summary, decode

pytestmark = pytest.mark.integration

LOAD_S = 10


@pytest.fixture(scope="module")
def blocking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    logs = tmp_path_factory.mktemp("logs")
    fake_port, port = free_port(), free_port()
    with Children() as children:
        fake = children.start(
            "fakegun",
            mailbench_command("fakegun", "--port", str(fake_port), "--latency", "fixed:0.2"),
            logs / "fakegun.log",
        )
        fake.wait_http(f"http://127.0.0.1:{fake_port}/_mailbench/stats")
        server = children.start(
            "server",
            mailbench_command("serve", "--mode", "blocking", "--port", str(port),
                              "--mailgun-url", f"http://127.0.0.1:{fake_port}"),
            logs / "server.log",
        )  # fmt: skip
        server.wait_http(f"http://127.0.0.1:{port}/")
        yield f"http://127.0.0.1:{port}"


def open_load(url: str, out: Path, rate: float) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(SCENARIOS_DIR / "sender.py"), "--headless",
         "--only-summary", "--host", url, "--run-time", f"{LOAD_S}s", "--stop-timeout", "2",
         "--hdr-out", str(out), "--exit-code-on-error", "0", "--loglevel", "WARNING",
         "Arrivals", "--users", "1", "--spawn-rate", "1", "--arrival-rate", f"{rate:g}",
         "--arrival-process", "constant", "--max-in-flight", "2", "--max-backlog", "5"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return read_locust(out)


def intended(data: dict[str, object], name: str) -> Summary:
    histograms = data["histograms"]
    assert isinstance(histograms, dict)
    return Summary.of(decode(histograms[f"{name}_intended"]))


def test_an_overloaded_mode_never_looks_better(blocking_server: str, tmp_path: Path) -> None:
    light = open_load(blocking_server, tmp_path / "light", rate=3)
    heavy = open_load(blocking_server, tmp_path / "heavy", rate=12)
    counters = heavy["counters"]
    assert isinstance(counters, dict)
    scheduled = counters["scheduled_starts"]
    assert counters.get("dropped_starts", 0) > scheduled / 3, counters
    # Every visit scheduled is in the times from intended start: served, failed, dropped
    # or unfinished (each makes one GET and one POST).
    for name in ("form", "send"):
        assert intended(heavy, name).count == scheduled, name
    # The dropped visits were due all through the load and never served: the tail is of
    # the load's own length, not the backlog's (a few visits' worth).
    assert intended(heavy, "send").p99_us >= LOAD_S / 2 * 1e6
    assert intended(heavy, "send").p99_us > intended(light, "send").p99_us
    assert intended(heavy, "send").p50_us > intended(light, "send").p50_us
