"""Tiers as processes, and servers mailbench did not start (``--target``)."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.process import Children, free_port, mailbench_command
from harness.results.folder import load_run

pytestmark = pytest.mark.integration


def mailbench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        mailbench_command(*args),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CI": "true", **(env or {})},
    )


def test_two_processes_per_tier_and_two_locust_processes(tmp_path: Path, redis_url: str) -> None:
    done = mailbench(
        "run", "--modes", "direct,redis", "--scenario", "sender", "--duration", "8",
        "--users", "20", "--latency", "fixed:0.05", "--server-procs", "2", "--worker-procs", "2",
        "--locust-procs", "2", "--warmup", "0", "--out", str(tmp_path),
        env={"REDIS_URL": redis_url},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = load_run(tmp_path / "latest")
    for accounted in run.accounting:
        mode, row = accounted.mode, accounted.counts
        # What the Locust processes journaled matches the ledger exactly.
        assert row.accepted > 0, row
        assert row.delivered == row.accepted, row
        assert (row.lost, row.unexpected, row.duplicates) == (0, 0, 0), row
        send = run.row(mode, "send")
        assert send is not None and send.count == row.accepted
        raw = tmp_path / "latest" / "raw" / mode
        servers = [json.loads(p.read_text()) for p in sorted(raw.glob("server-*.json"))]
        assert len(servers) == 2
        # The kernel spread the connections over both server processes.
        assert all(server["accepted"] for server in servers), mode
        assert sum(server["accepted"] for server in servers) >= row.accepted
    assert len(list((tmp_path / "latest" / "raw" / "redis").glob("worker-*.json"))) == 2


@pytest.fixture
def external_redis_server(tmp_path: Path, redis_url: str) -> Iterator[tuple[str, int]]:
    """A `mailbench serve --mode redis` and its worker, started as a user would, both
    sending to a fake Mailgun port that the harness will open."""
    fake_port, port = free_port(), free_port()
    queue = f"external-{uuid.uuid4().hex[:8]}"
    mailgun = ["--mailgun-url", f"http://127.0.0.1:{fake_port}"]
    with Children() as children:
        server = children.start(
            "server",
            mailbench_command("serve", "--mode", "redis", "--port", str(port),
                              "--queue-url", redis_url, "--queue-name", queue, *mailgun),
            tmp_path / "server.log",
        )  # fmt: skip
        children.start(
            "worker",
            mailbench_command("worker", "--backend", redis_url, "--queue-name", queue,
                              "--concurrency", "50", *mailgun),
            tmp_path / "worker.log",
        )  # fmt: skip
        server.wait_http(f"http://127.0.0.1:{port}/")
        yield f"http://127.0.0.1:{port}", fake_port


def test_target_drives_a_server_it_did_not_start(
    tmp_path: Path, external_redis_server: tuple[str, int]
) -> None:
    url, fake_port = external_redis_server
    out = tmp_path / "results"
    done = mailbench(
        "run", "--target", url, "--target-name", "my-app", "--fakegun-port", str(fake_port),
        "--scenario", "sender", "--duration", "6", "--users", "10", "--latency", "fixed:0.2",
        "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = load_run(out / "latest")
    [accounted] = run.accounting
    row = accounted.counts
    assert accounted.mode == "my-app"
    assert row.accepted > 0 and row.delivered == row.accepted, row
    assert (row.lost, row.unexpected) == (0, 0), row
    send = run.row("my-app", "send")
    assert send is not None and send.p50_us < 200_000  # queued: faster than one API call
    manifest = run.manifest["config"]["target"]
    assert manifest["url"] == url and manifest["name"] == "my-app"
    # The fake the harness started is gone: the external server's next call fails.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{fake_port}/_mailbench/stats", timeout=2)
