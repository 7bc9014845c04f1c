"""`mailbench chaos`: its refusals in one sentence, its seeded plan, and a server restart
carried out at its moment and written down (on stand-ins for the processes)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness.errors import ConfigError
from harness.run.chaos import Chaos, ChaosSettings, add_cli_arguments, check_chaos_args
from harness.run.cli import target_from_args
from harness.run.config import RunConfig
from harness.run.tiers import Tiers
from servers.modes import mode


def check(*argv: str) -> None:
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    args = parser.parse_args(list(argv))
    target = target_from_args(args)
    modes = (target.name,) if target is not None else tuple(args.modes.split(","))
    has_workers = bool(target.worker_cmd) if target else any(mode(m).queued for m in modes)
    kills = args.kill_workers if args.kill_workers is not None else 5 * has_workers
    check_chaos_args(args, target, modes, kills, has_workers)


TARGET = ("--target", "http://127.0.0.1:9000")


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (("--modes", "redis", "--restart-servers", "2"), "needs --server-procs 2 or more"),
        (("--modes", "direct"), "direct sends in the request, so chaos can only restart"),
        (("--modes", "direct", "--restart-servers", "1", "--server-procs", "2",
          "--kill-workers", "2"), "direct has no workers, so no worker to kill"),
        (TARGET, "give the target's --server-cmd and/or --worker-cmd"),
        ((*TARGET, "--worker-cmd", "w", "--restart-servers", "1", "--server-procs", "2"),
         "give --server-cmd"),
        ((*TARGET, "--server-cmd", "s", "--kill-workers", "1"), "the target has no --worker-cmd"),
        (("--server-cmd", "s"), "give its URL with --target URL too"),
        ((*TARGET, "--server-cmd", "'unclosed"), "check its quotes"),
        ((*TARGET, "--server-cmd", ""), "--server-cmd is empty"),
    ],
)  # fmt: skip
def test_what_cannot_be_broken_is_one_sentence(argv: tuple[str, ...], says: str) -> None:
    with pytest.raises(ConfigError, match=says.replace("(", r"\(")) as refused:
        check(*argv)
    assert str(refused.value).count(". ") == 0 and str(refused.value).endswith(".")


@pytest.mark.parametrize(
    "argv",
    [
        ("--modes", "redis", "--restart-servers", "2", "--server-procs", "2"),
        ("--modes", "direct,redis", "--restart-servers", "1", "--server-procs", "2"),
        (*TARGET, "--server-cmd", "s", "--server-procs", "2", "--restart-servers", "2"),
        (*TARGET, "--worker-cmd", "w"),  # five worker kills by default
    ],
)  # fmt: skip
def test_what_can_be_broken_passes(argv: tuple[str, ...]) -> None:
    check(*argv)


@dataclass
class Stand:
    """A process stand-in: a name, as the hooks report it."""

    name: str


@dataclass
class Starter:
    """Records what the hooks ask of the processes."""

    restarted: list[str] = field(default_factory=list)
    started: int = 2

    def restart_server(self, tiers: Tiers, victim: Stand) -> Stand:
        tiers.servers.remove(victim)  # type: ignore[arg-type]
        replacement = Stand(f"server {self.started} (redis)")
        self.started += 1
        tiers.servers.append(replacement)  # type: ignore[arg-type]
        self.restarted.append(victim.name)
        return replacement

    def replace_exited_workers(self, tiers: Tiers) -> list[str]:
        return []


def tiers(tmp_path: Path, name: str = "redis") -> Tiers:
    servers = [Stand(f"server {i} ({name})") for i in range(2)]
    return Tiers(mode(name), name, tmp_path, "http://x", 1, None, "q", servers=servers)  # type: ignore[arg-type]


def plan(tmp_path: Path, settings: ChaosSettings) -> Chaos:
    chaos = Chaos(settings, RunConfig(duration_s=20), services=None)  # type: ignore[arg-type]
    chaos.before_load(tiers(tmp_path), Starter())  # type: ignore[arg-type]
    return chaos


def test_server_restarts_leave_a_seeds_worker_kills_where_they_were(tmp_path: Path) -> None:
    without = plan(tmp_path, ChaosSettings(kill_workers=3, seed=7)).plan
    with_restarts = plan(tmp_path, ChaosSettings(kill_workers=3, seed=7, restart_servers=2)).plan
    assert with_restarts.kills == without.kills and len(without.kills) == 3
    assert len(with_restarts.server_restarts) == 2 and without.server_restarts == []
    assert all(2.0 <= at <= 17.0 for at in with_restarts.server_restarts)  # 10–85 % of 20 s
    again = plan(tmp_path, ChaosSettings(kill_workers=3, seed=7, restart_servers=2)).plan
    assert again.server_restarts == with_restarts.server_restarts


def test_a_server_restart_happens_at_its_moment_and_is_written_down(tmp_path: Path) -> None:
    settings = ChaosSettings(kill_workers=0, restart_broker=False, restart_servers=2)
    chaos = Chaos(settings, RunConfig(duration_s=20), services=None)  # type: ignore[arg-type]
    running, starter = tiers(tmp_path), Starter()
    chaos.before_load(running, starter)  # type: ignore[arg-type]
    first, _ = chaos.plan.server_restarts
    chaos.tick(running, first - 0.1)
    assert starter.restarted == []
    chaos.tick(running, first)
    assert len(starter.restarted) == 1 and len(running.servers) == 2
    chaos.before_drain(running)  # what the load ended too soon for still happens
    assert len(starter.restarted) == 2
    whats = [(e.kind, e.what) for e in chaos.plan.events]
    assert [kind for kind, _ in whats] == ["server-kill", "server-restart"] * 2
    assert whats[0][1] == f"SIGKILL {starter.restarted[0]}"
    assert whats[1][1].startswith(f"restarted {starter.restarted[0]} as server 2 (redis)")


def test_an_in_request_mode_has_no_broker_to_restart(tmp_path: Path) -> None:
    chaos = Chaos(ChaosSettings(restart_servers=1), RunConfig(duration_s=20), services=None)  # type: ignore[arg-type]
    chaos.before_load(tiers(tmp_path, "direct"), Starter())  # type: ignore[arg-type]
    assert chaos.plan.restart_at is None and len(chaos.plan.server_restarts) == 1
