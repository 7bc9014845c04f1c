"""Server processes SIGKILLed and restarted under load, as a deploy does: the load keeps
getting 2xx from the others and nothing accepted is lost; the same for a target whose
server and worker processes the harness started from their commands; and a fake with
faults and a rate limit for any target."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.process import free_port, mailbench_command
from harness.results.accounting import reconcile
from harness.results.collect import client_sends, dead_lettered_recipients, read_locust
from harness.results.folder import load_run
from harness.run.chaos import short_lease
from harness.services.settings import ENV_VARS, ServiceSettings
from servers.queue_url import QUEUE_URL_VAR

pytestmark = pytest.mark.integration

DURATION = 14
# No faults: the run is about the restarts, and a busy machine gets through it sooner.
CALM = ["--api-faults", "", "--rate-limit", ""]


def run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=840, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def events_of(raw: Path) -> list[dict[str, object]]:
    events: list[dict[str, object]] = json.loads((raw / "chaos-events.json").read_text())
    return events


def answered_between(run_dir: Path, start_s: float, end_s: float) -> int:
    """Sends answered 2xx in the seconds from ``start_s`` to ``end_s`` of the load."""
    rows = load_run(run_dir).timeseries
    return sum(
        (r.requests or 0) - (r.errors or 0)
        for r in rows
        if r.metric == "send" and int(start_s) <= r.second <= int(end_s) + 1
    )


def assert_restarted_servers_and_kept_serving(run_dir: Path, raw: Path, restarts: int) -> None:
    events = events_of(raw)
    whats = [str(e["what"]) for e in events]
    kills = [e for e in events if e["kind"] == "server-kill"]
    restarted = [e for e in events if e["kind"] == "server-restart"]
    assert [str(e["what"]).split()[0] for e in kills] == ["SIGKILL"] * restarts, whats
    assert [str(e["what"]).split()[:2] for e in restarted] == [["restarted", "server"]] * restarts
    # While a server was down, the other one answered sends with 2xx. Events count from
    # the harness's start of the load, the timeline from Locust's first request, which a
    # busy machine delays by seconds: the shift is what Locust's run fell short of.
    locust = read_locust(raw)
    shift = DURATION - (float(locust["stopped_at"]) - float(locust["first_request_at"]))
    checked = 0
    for kill, done in zip(kills, restarted, strict=True):
        killed_at = float(str(kill["at_s"])) - shift
        answered_at = float(str(done["at_s"])) - shift
        if 0 <= killed_at < DURATION - shift - 1:  # during the load, not after it
            assert answered_between(run_dir, killed_at, answered_at) > 0, (kill, done, shift)
            checked += 1
    assert checked, (kills, shift)


def assert_nothing_lost_and_a_planted_loss_is_seen(run_dir: Path, raw: Path) -> None:
    [accounted] = load_run(run_dir).accounting
    row = accounted.counts
    assert row.accepted > 20, row
    assert (row.lost, row.unexpected) == (0, 0), row
    assert row.delivered + row.dead_lettered == row.accepted
    # Negative control: the same reconciliation, with one delivered email taken out of
    # the ledger, reports exactly that email lost.
    accepted, failed = client_sends(raw)
    ledger = json.loads((raw / "ledger.json").read_text())
    delivered_to = {str(r).casefold() for r, _ in accepted}
    first = next(i for i, e in enumerate(ledger) if e["recipients"][0].casefold() in delivered_to)
    planted = [e for e in ledger if e["recipients"][0] != ledger[first]["recipients"][0]]
    counts, _ = reconcile(accepted, planted, dead_lettered_recipients(raw), failed)
    assert counts.lost == 1, counts


@pytest.mark.timeout(900)
def test_server_restarts_under_load_lose_nothing(
    tmp_path: Path, make_service_settings: Callable[[], ServiceSettings]
) -> None:
    settings = make_service_settings()
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS.values()}
    out = tmp_path / "results"
    run(
        [sys.executable, "-m", "harness.cli", "chaos", "--modes", "redis",
         "--duration", str(DURATION), "--users", "8", "--kill-workers", "1",
         "--restart-servers", "2", "--server-procs", "2", "--no-restart-broker", *CALM,
         "--out", str(out), "--services-dir", str(settings.base_dir), "--no-install",
         "--port", f"redis={settings.redis_port}"],
        env,
    )  # fmt: skip
    run_dir = out / "latest"
    raw = run_dir / "raw" / "redis"
    assert_restarted_servers_and_kept_serving(run_dir, raw, restarts=2)
    assert_nothing_lost_and_a_planted_loss_is_seen(run_dir, raw)
    assert "2 servers restarted" in (run_dir / "chaos.md").read_text()


@pytest.mark.timeout(900)
def test_chaos_breaks_a_target_it_started_from_its_commands(tmp_path: Path, redis_url: str) -> None:
    # mailbench's own server and worker, started as if they were someone else's app: by
    # their commands, told the fake's URL and the port in the environment.
    port, queue = free_port(), f"target-{tmp_path.name}"
    server = [*mailbench_command("serve", "--mode", "redis", "--reuse-port", "--queue-name", queue),
              "--port", "$MAILBENCH_PORT", "--mailgun-url", "$MAILBENCH_MAILGUN_URL"]  # fmt: skip
    worker = [*mailbench_command("worker", "--queue-name", queue, "--concurrency", "20"),
              "--mailgun-url", "${MAILBENCH_MAILGUN_URL}"]  # fmt: skip
    env = {**os.environ, QUEUE_URL_VAR: short_lease(redis_url, "visibility")}
    out = tmp_path / "results"
    run(
        [sys.executable, "-m", "harness.cli", "chaos", "--target", f"http://127.0.0.1:{port}",
         "--server-cmd", shlex.join(server), "--worker-cmd", shlex.join(worker),
         "--duration", str(DURATION), "--users", "8", "--kill-workers", "2",
         "--restart-servers", "1", "--server-procs", "2", *CALM, "--out", str(out)],
        env,
    )  # fmt: skip
    run_dir = out / "latest"
    raw = run_dir / "raw" / "target"
    whats = [str(e["what"]) for e in events_of(raw)]
    assert sum(w.startswith("SIGKILL worker worker") for w in whats) == 2, whats
    assert_restarted_servers_and_kept_serving(run_dir, raw, restarts=1)
    assert_nothing_lost_and_a_planted_loss_is_seen(run_dir, raw)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["config"]["target"]["server_cmd"][-1] == "$MAILBENCH_MAILGUN_URL"
    # Each process's log is the target's: started by the commands given.
    logs = sorted(p.name for p in (run_dir / "logs").glob("target-*.log"))
    assert "target-server-2.log" in logs and "target-worker-3.log" in logs, logs


@pytest.mark.timeout(600)
def test_a_targets_fake_injects_faults_and_a_rate_limit(tmp_path: Path) -> None:
    # In the request (mode direct), so each fault and 429 is a failed send the load sees.
    port = free_port()
    server = [*mailbench_command("serve", "--mode", "direct"),
              "--port", "$MAILBENCH_PORT", "--mailgun-url", "$MAILBENCH_MAILGUN_URL"]  # fmt: skip
    out = tmp_path / "results"
    run(
        [sys.executable, "-m", "harness.cli", "run", "--target", f"http://127.0.0.1:{port}",
         "--server-cmd", shlex.join(server), "--scenario", "sender", "--users", "6",
         "--duration", "8", "--warmup", "1", "--latency", "fixed:0.01",
         "--api-faults", "503:0.3", "--rate-limit", "10:2", "--out", str(out)],
    )  # fmt: skip
    run_dir = out / "latest"
    stats = json.loads((run_dir / "raw" / "target" / "fakegun-stats.json").read_text())
    assert stats["faults"]["503"] > 0 and stats["rate_limited"] > 0, stats
    [accounted] = load_run(run_dir).accounting
    row = accounted.counts
    # A 503 or 429 from the API is a failed send, nothing delivered: never lost.
    assert row.failed_requests > 0 and row.accepted > 0, row
    assert (row.lost, row.unexpected) == (0, 0), row
    send = next(r for r in load_run(run_dir).summary if r.metric == "send")
    assert send.errors and send.errors > 0, send
