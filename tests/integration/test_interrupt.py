"""Ctrl-C in the middle of a run leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_stops_every_child(tmp_path: Path, sig: int) -> None:
    harness = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "harness.cli",
            "run",
            "--modes",
            "direct,blocking",
            "--duration",
            "60",
            "--users",
            "5",
            "--out",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        seen: set[int] = set()
        deadline = time.monotonic() + 60
        # Wait until the fake, the server and Locust all run.
        while time.monotonic() < deadline and len(seen) < 3:
            seen |= descendants(harness.pid)
            time.sleep(0.5)
        time.sleep(2)
        seen |= descendants(harness.pid)
        assert len(seen) >= 3, "the run never started its children"
        harness.send_signal(sig)
        harness.wait(60)
        survivors = [pid for pid in seen if running(pid)]
        deadline = time.monotonic() + 10
        while survivors and time.monotonic() < deadline:
            time.sleep(0.2)
            survivors = [pid for pid in survivors if running(pid)]
        assert survivors == []
        assert harness.returncode != 0
    finally:
        if harness.poll() is None:
            os.kill(harness.pid, signal.SIGKILL)
            harness.wait()
