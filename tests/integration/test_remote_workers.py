"""Locust workers on another host: ``mailbench run --expect-workers N`` binds its Locust
master to an address other hosts reach, and their measurements reach the results through
it alone (their files stay on their host).

The other host is a network namespace of this machine, joined to it by a veth pair on a
10.x address of its own; the server under test listens on this side of the pair."""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.process import Children, free_port, mailbench_command
from harness.results.accounting import recipient_of
from harness.results.collect import client_sends, read_locust
from harness.results.folder import load_run
from harness.run.config import SCENARIOS_DIR

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class OtherHost:
    namespace: str
    here: str  # this side's address on the pair
    there: str  # the namespace's


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def other_host() -> Iterator[OtherHost]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    name = f"mb{secrets.token_hex(3)}"
    net = f"10.{random.randrange(200, 250)}.{random.randrange(0, 256)}"
    host = OtherHost(name, f"{net}.1", f"{net}.2")
    try:
        ip("netns", "add", name)
        ip("link", "add", f"{name}a", "type", "veth", "peer", "name", f"{name}b")
        ip("link", "set", f"{name}b", "netns", name)
        ip("addr", "add", f"{host.here}/30", "dev", f"{name}a")
        ip("link", "set", f"{name}a", "up")
        ip("netns", "exec", name, "ip", "addr", "add", f"{host.there}/30", "dev", f"{name}b")
        ip("netns", "exec", name, "ip", "link", "set", f"{name}b", "up")
        ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield host
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", f"{name}a"], capture_output=True, timeout=30)


def test_workers_on_another_host_are_merged_and_accounted(
    other_host: OtherHost, tmp_path: Path
) -> None:
    fake_port, port, master_port = free_port(), free_port(), free_port()
    fake_url = f"http://127.0.0.1:{fake_port}"
    with Children() as children:
        fake = children.start(
            "fakegun",
            mailbench_command("fakegun", "--port", str(fake_port), "--latency", "fixed:0.1"),
            tmp_path / "fakegun.log",
        )
        fake.wait_http(f"{fake_url}/_mailbench/stats")
        server = children.start(
            "server",
            mailbench_command("serve", "--mode", "direct", "--host", other_host.here,
                              "--port", str(port), "--mailgun-url", fake_url),
            tmp_path / "server.log",
        )  # fmt: skip
        target = f"http://{other_host.here}:{port}"
        server.wait_http(f"{target}/")
        for n in range(2):  # two load generators on the other host, no files of theirs
            children.start(
                f"locust worker {n}",
                ["ip", "netns", "exec", other_host.namespace, sys.executable, "-m", "locust",
                 "-f", str(SCENARIOS_DIR / "sender.py"), "--worker",
                 "--master-host", other_host.here, "--master-port", str(master_port)],
                tmp_path / f"worker-{n}.log",
            )  # fmt: skip
        done = subprocess.run(
            mailbench_command(
                "run", "--target", target, "--fakegun-url", fake_url, "--scenario", "sender",
                "--users", "10", "--duration", "8", "--warmup", "0", "--expect-workers", "2",
                "--master-host", other_host.here, "--master-port", str(master_port),
                "--out", str(tmp_path / "results"),
            ),
            capture_output=True, text=True, timeout=240, env={**os.environ, "CI": "true"},
        )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = load_run(tmp_path / "results" / "latest")
    [accounted] = run.accounting
    counts = accounted.counts
    assert counts.accepted > 20, counts
    assert (counts.lost, counts.unexpected, counts.unacknowledged) == (0, 0, 0), counts
    assert counts.delivered == counts.accepted
    send = run.row("target", "send")
    assert send is not None and send.count == counts.accepted  # no warm-up: every send
    raw = tmp_path / "results" / "latest" / "raw" / "target"
    # Only the master's journal is here; it holds both workers' chunks.
    assert len(list(raw.glob("locust-hdr-*.jsonl"))) == 1
    assert read_locust(raw)["processes"] == 2
    ledger = json.loads((raw / "ledger.json").read_text())
    accepted, _ = client_sends(raw)
    assert {recipient_of(e) for e in ledger} == {r.casefold() for r, _ in accepted}
