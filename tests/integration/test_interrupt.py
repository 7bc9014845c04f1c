"""Ctrl-C in the middle of a run leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.process import Pid, family
from harness.results.folder import load_run
from harness.services.settings import ENV_VARS, ServiceSettings

pytestmark = pytest.mark.integration


def descendants(pid: int) -> set[int]:
    leader = Pid.of(pid)
    return {p.pid for p in family(leader)} - {pid} if leader else set()


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_stops_every_child_and_keeps_what_finished(
    tmp_path: Path, sig: int, make_service_settings: Callable[[], ServiceSettings]
) -> None:
    # A broker of its own, so that stopping it is part of what is checked.
    settings = make_service_settings()
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS.values()}
    harness = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "run", "--modes", "direct,redis",
         "--duration", "6", "--users", "5", "--out", str(tmp_path / "results"),
         "--services-dir", str(settings.base_dir), "--port", f"redis={settings.redis_port}",
         "--no-install"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        seen: set[int] = set()
        deadline = time.monotonic() + 90
        # Wait until the second mode runs: its broker, server, worker and Locust.
        while time.monotonic() < deadline:
            seen |= descendants(harness.pid)
            lines = {cmdline(pid) for pid in seen if running(pid)}
            if any("locust" in c and "raw/redis" in c for c in lines):
                break
            time.sleep(0.3)
        time.sleep(1.5)
        seen |= descendants(harness.pid)
        names = " ".join(cmdline(pid) for pid in seen)
        assert "redis-server" in names and "worker" in names, names
        harness.send_signal(sig)
        output, _ = harness.communicate(timeout=60)
        survivors = [pid for pid in seen if running(pid)]
        deadline = time.monotonic() + 10
        while survivors and time.monotonic() < deadline:
            time.sleep(0.2)
            survivors = [pid for pid in survivors if running(pid)]
        assert survivors == [], [cmdline(pid) for pid in survivors]
        assert harness.returncode != 0
        # The mode that finished is kept, with its report.
        run = load_run(tmp_path / "results" / "latest")
        assert [r.mode for r in run.accounting] == ["direct"]
        assert "redis** was planned but did not run" in (run.path / "report.md").read_text()
        assert "interrupted: the finished modes (direct)" in output
    finally:
        if harness.poll() is None:
            os.kill(harness.pid, signal.SIGKILL)
            harness.wait()
