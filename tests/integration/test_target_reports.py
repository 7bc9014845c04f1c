"""Target runs read as the user's stacks: two ``mailbench run --target`` runs against
reference servers standing in for users' apps, then ``mailbench report A B`` compares
them one row per target; and a run keeps its brokers out of the folder it starts in."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from harness.process import Children, free_port, mailbench_command
from harness.results.folder import load_run
from harness.services.settings import ENV_VARS, ServiceSettings

pytestmark = pytest.mark.integration

LABEL = "aiohttp direct, one process"


def mailbench(*args: str, **options: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        mailbench_command(*args), capture_output=True, text=True, timeout=240, **options
    )  # type: ignore[call-overload]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done  # type: ignore[no-any-return]


@pytest.fixture
def children() -> Iterator[Children]:
    with Children() as started:
        yield started


def test_two_target_runs_compare_one_filled_row_per_target(
    children: Children, tmp_path: Path
) -> None:
    fake_port = free_port()
    urls = {}
    for mode in ("direct", "blocking"):  # two stacks: an async and a blocking API client
        port = free_port()
        server = children.start(
            f"app-{mode}",
            mailbench_command("serve", "--mode", mode, "--port", str(port),
                              "--mailgun-url", f"http://127.0.0.1:{fake_port}"),
            tmp_path / f"{mode}.log",
        )  # fmt: skip
        urls[mode] = f"http://127.0.0.1:{port}"
        server.wait_http(f"{urls[mode]}/")
    runs = {}
    for mode, label in (("direct", ["--target-label", LABEL]), ("blocking", [])):
        out = tmp_path / mode
        mailbench(
            "run", "--target", urls[mode], "--fakegun-port", str(fake_port), "--users", "4",
            "--scenario", "sender", "--duration", "5", "--warmup", "1", "--out", str(out),
            *label,
        )  # fmt: skip
        runs[mode] = (out / "latest").resolve()

    direct = load_run(runs["direct"])
    assert direct.manifest["config"]["target"]["label"] == LABEL
    counts = direct.accounting_of("target")
    assert counts is not None and counts.accepted > 0 and counts.sound, direct.accounting
    report = (runs["direct"] / "report.md").read_text()
    assert report.startswith(f"# mailbench run {direct.manifest['run_id']}: {LABEL}\n")
    assert f"| {LABEL} | " in report  # the gap and accounting tables name the stack
    for harness_only in ("worker_procs", "server_procs", "worker_concurrency", "aiohttp 3"):
        assert harness_only not in report, harness_only
    assert LABEL in (runs["direct"] / "report.html").read_text()
    assert LABEL in (runs["direct"] / "charts" / "gap.svg").read_text()
    # Without --target-label, the URL's host:port names the stack.
    blocking = urls["blocking"].removeprefix("http://")
    assert f"| {blocking} | " in (runs["blocking"] / "report.md").read_text()

    out = tmp_path / "compare"
    mailbench("report", str(runs["direct"]), str(runs["blocking"]), "--out", str(out))
    text = (out / "comparison.md").read_text()
    latency = text.split("## Latency and the gap", 1)[1].split("##", 1)[0]
    rows = [line for line in latency.splitlines() if re.match(r"\| [AB] \|", line)]
    assert [r.split(" | ")[1] for r in rows] == [LABEL, blocking], latency
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert "–" not in cells and len(cells) == 9, row  # form, send, delivery, the gap
    accounting = text.split("## Accounting", 1)[1]
    assert re.search(rf"\| A \| {re.escape(LABEL)} \| [1-9]", accounting), accounting
    for chart in ("compare-gap", "compare-latency"):
        svg = (out / "charts" / f"{chart}.svg").read_text()
        assert "blocking" not in svg and blocking in svg and "aiohttp direct," in svg


def test_a_run_leaves_nothing_in_its_folder_and_removes_its_brokers_data(
    tmp_path: Path,
    make_service_settings: Callable[[], ServiceSettings],
    service_unavailable: Callable[[str], NoReturn],
) -> None:
    cwd, temp, out = tmp_path / "cwd", tmp_path / "tmp", tmp_path / "results"
    cwd.mkdir()
    temp.mkdir()
    temp.chmod(0o711)  # the brokers' directory is made here (TMPDIR), as in /tmp
    port = make_service_settings().redis_port
    env = {**os.environ, "TMPDIR": str(temp), "CI": "true"}  # a missing broker fails
    for variable in ENV_VARS.values():
        env.pop(variable, None)  # a Redis of the run's own
    done = subprocess.run(
        mailbench_command(
            "run", "--modes", "redis", "--scenario", "sender", "--users", "3", "--duration",
            "3", "--warmup", "1", "--out", str(out), "--port", f"redis={port}",
        ),
        cwd=cwd, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    if done.returncode != 0 and "is not installed" in done.stderr:
        service_unavailable(done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    counts = load_run(out / "latest").accounting_of("redis")
    assert counts is not None and counts.delivered > 0  # the run really had its broker
    assert list(cwd.iterdir()) == []
    assert [p for p in temp.iterdir() if p.name.startswith("mailbench-services-")] == []
    # Nor did the brokers' data or credentials go to the results.
    assert not list(out.rglob("credentials.json")) and not list(out.rglob("*.aof*"))
