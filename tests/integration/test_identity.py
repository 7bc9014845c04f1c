"""Children prove who they are: a port someone else holds is an error, never their figures.

A stranger here is what a user leaves running by mistake: a ``mailbench fakegun`` or a
``mailbench serve`` started by hand, on the port the harness was told (or chose) to use.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.process import Children, free_port, mailbench_command
from harness.results.folder import load_run
from servers.fakegun.admin import FakegunAdmin

pytestmark = pytest.mark.integration

AUTH = ("api", "key-mailbench")


def mailbench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(mailbench_command(*args), capture_output=True, text=True, timeout=120)


@pytest.fixture
def children() -> Iterator[Children]:
    with Children() as started:
        yield started


@pytest.fixture
def target(children: Children, tmp_path: Path) -> str:
    """A reference server in direct mode, standing in for a user's app (only its form page
    is used: the runs below read, they do not send)."""
    port = free_port()
    server = children.start(
        "target",
        mailbench_command("serve", "--mode", "direct", "--port", str(port)),
        tmp_path / "target.log",
    )
    server.wait_http(f"http://127.0.0.1:{port}/")
    return f"http://127.0.0.1:{port}"


def test_a_stranger_fake_on_the_port_is_an_error_and_keeps_its_ledger(
    children: Children, target: str, tmp_path: Path
) -> None:
    port = free_port()
    stranger = children.start(
        "stranger",
        mailbench_command("fakegun", "--port", str(port), "--latency", "fixed:0.01"),
        tmp_path / "stranger.log",
    )
    url = f"http://127.0.0.1:{port}"
    stranger.wait_http(f"{url}/_mailbench/stats")
    sent = httpx.post(
        f"{url}/v3/example.com/messages",
        auth=AUTH,
        data={"from": "a@example.com", "to": "someone@example.com", "subject": "s", "text": "t"},
    )
    assert sent.status_code == 200

    done = mailbench(
        "run", "--target", target, "--fakegun-port", str(port), "--scenario", "reader",
        "--duration", "2", "--warmup", "0", "--users", "2", "--out", str(tmp_path / "results"),
    )  # fmt: skip
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    sentence = done.stderr.strip().splitlines()[-1]
    assert f"Port {port} is taken" in sentence and "--fakegun-port 0" in sentence, sentence
    # Nothing of the stranger's was reset, and it still runs its own latency model.
    stats = FakegunAdmin(url).stats()
    assert (stats["accepted"], stats["latency"]) == (1, "fixed:0.01"), stats
    assert stranger.alive()


def test_fakegun_port_0_is_any_free_port_and_the_run_says_which(
    target: str, tmp_path: Path
) -> None:
    out = tmp_path / "results"
    done = mailbench(
        "run", "--target", target, "--fakegun-port", "0", "--scenario", "reader",
        "--duration", "2", "--warmup", "0", "--users", "2", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    run = load_run(out / "latest")
    fake_url = run.manifest["fakegun"]["url"]
    port = int(fake_url.rsplit(":", 1)[1])
    assert port > 0 and fake_url in done.stdout
    assert run.manifest["config"]["target"]["fakegun"] == "started on any free port"
    log = (out / "latest" / "logs" / "fakegun.log").read_text()
    assert f"listening on http://127.0.0.1:{port}" in log, log
    # The run took its generator-floor sample first, and its report says it.
    floor = run.manifest["generator_floor_us"]
    assert 0 < floor["p50"] <= floor["p99"] and floor["samples"] > 0, floor
    assert "The generator adds ~" in (out / "latest" / "report.md").read_text()


def test_a_server_readiness_check_rejects_a_stranger_on_its_port(
    children: Children, tmp_path: Path
) -> None:
    """The harness picks a free port for its server; should anyone else take it first, the
    server it starts cannot bind, and the stranger's answers must not pass for it."""
    from harness.errors import ProcessFailed
    from harness.run.config import RunConfig
    from harness.run.tiers import Tiers, TierStarter
    from servers.modes import mode

    port = free_port()
    stranger = children.start(
        "stranger",
        mailbench_command("serve", "--mode", "direct", "--port", str(port)),
        tmp_path / "stranger.log",
    )
    stranger.wait_http(f"http://127.0.0.1:{port}/")
    config = RunConfig(modes=("direct",), out=tmp_path, run_id="identity")
    starter = TierStarter(config, children, "http://127.0.0.1:9", "secret")
    raw = tmp_path / "raw"
    tiers = Tiers(mode("direct"), "direct", raw, f"http://127.0.0.1:{port}", port, None, "")
    with pytest.raises(ProcessFailed, match=f"[Pp]ort {port} is taken"):
        starter.start_servers(tiers)
    assert stranger.alive()
    metrics = httpx.get(f"http://127.0.0.1:{port}/_mailbench/metrics").json()
    assert json.dumps(metrics)  # the stranger still answers, untouched
