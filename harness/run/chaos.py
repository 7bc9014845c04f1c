"""``mailbench chaos``: does a 2xx from ``POST /send`` still mean "will be delivered"
when workers crash, the broker restarts and the API misbehaves?

Per queued mode: a sender load runs for ``--duration`` seconds while the harness
SIGKILLs a random worker at ``--kill-workers`` random moments (and starts a
replacement at once, as a supervisor would), restarts the broker once half-way
(``--restart-broker``: a crash — SIGKILL for Redis and RabbitMQ, an immediate
shutdown for PostgreSQL — then a start on the same data; SQLite has no broker
process, so the server processes that write its file are killed and restarted
instead; the local SQS server, moto, keeps its queues in memory alone, so its restart
is skipped, with an event and a note that say so), and the fake Mailgun injects
``--api-faults`` and a ``--rate-limit``.
Then it drains and prints the accounting per backend: accepted, delivered,
duplicates, dead-lettered, lost (must be 0) and unexpected (must be 0).

Durability is what each backend is configured with for every run: RabbitMQ durable
queues, persistent messages and publisher confirms; Redis with the AOF (fsync every
second; a process crash loses nothing, a power loss up to a second); PostgreSQL with
fsync on; SQLite in WAL mode. Jobs held by a killed worker come back after the
broker notices: RabbitMQ at once (the connection closed), Redis and the SQL tables
after a visibility timeout or lease, shortened here to :data:`LEASE_S`.

With ``--restart-servers N`` (and ``--server-procs`` 2 or more) it also SIGKILLs a random
server process at N seeded moments and starts another in its place, as a deploy does,
while the others keep serving the port: in-request modes too, which have nothing else
to break. A send in flight on the killed process fails; if its email was queued or sent
all the same, it counts as ``unacknowledged``, never as lost or unexpected.

With ``--target URL --server-cmd CMD --worker-cmd CMD`` the processes broken are those of
an app of your own, which the harness starts from those commands
(:meth:`harness.run.tiers.TierStarter.external`); its broker is left alone.

Framework modes (``--modes frameworks``) are broken the same way. Their worker is a
process tree (RQ's pool, its forked workers and their work-horses): a kill freezes and
SIGKILLs all of it, as a host or container crash would, and the lease reaches the
framework's own setting where it has one (Celery's Redis visibility timeout, RQ's
registry maintenance interval) in the ``reliable`` configuration; ``default`` keeps the
framework's as it ships, so what it loses under a crash is the finding.

The shortcuts (``--modes shortcuts``) are broken the same way: ``naive``'s workers are
killed as any worker (what they had taken is gone: auto-ack), and ``background`` has no
worker and no broker: its queue is its server processes' memory, so the broker restart
is a SIGKILL of those servers, and the sends they had in flight are lost.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from harness.errors import ConfigError
from harness.results.accounting import COLUMNS
from harness.results.folder import ModeResult
from harness.run.cli import (
    add_fault_arguments,
    add_target_arguments,
    drive,
    fake_options,
    target_from_args,
    warn_unsound,
)
from harness.run.config import RunConfig
from harness.run.driver import FAKEGUN_STATS, Hooks
from harness.run.target import Target
from harness.run.tiers import Tiers, TierStarter
from harness.services.brokers import BROKERS
from harness.services.manager import Services, add_service_arguments, settings_from_args
from harness.services.settings import ENV_VARS
from servers.fakegun.admin import FakegunAdmin
from servers.modes import QUEUED, parse_modes
from servers.modes import mode as mode_named

log = logging.getLogger(__name__)

LEASE_S = 10.0  # a dead worker's jobs come back after this (the default is 30 s)
DEFAULT_FAULTS = "500:0.03,502:0.03,503:0.04"


@dataclass(frozen=True, slots=True)
class ChaosSettings:
    kill_workers: int = 5
    restart_broker: bool = True
    seed: int = 1
    restart_servers: int = 0  # server processes SIGKILLed and started again per mode


@dataclass
class Event:
    at_s: float
    # "kill" (a worker), "restart" (the broker), "crash" (a worker that exited by itself),
    # "server-kill" and "server-restart" (a server process, as a deploy replaces it), or
    # "skip" (a broker restart not made: the broker keeps its queues in memory alone)
    kind: str
    what: str

    def as_json(self) -> dict[str, Any]:
        return {"at_s": round(self.at_s, 2), "kind": self.kind, "what": self.what}


@dataclass
class _Plan:
    """What to break in one mode, and when (seconds into the load)."""

    kills: list[float]
    restart_at: float | None
    server_restarts: list[float] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


class Chaos(Hooks):
    """The run's hooks that break things: planned per mode, carried out while the load
    runs, written down with the mode's results."""

    def __init__(self, settings: ChaosSettings, config: RunConfig, services: Services) -> None:
        self.settings = settings
        self.config = config
        self.services = services
        self.rng = random.Random(settings.seed)
        self.plan = _Plan([], None)
        self._starter: TierStarter | None = None

    def queue_url(self, url: str, mode: str) -> str:
        return short_lease(url, mode_named(mode).lease_parameter)

    def drain_timeout(self, configured: float) -> float:
        # Retries of hung calls (the client's timeout each), backoff and leases add up.
        return max(configured, 300.0)

    def before_load(self, tiers: Tiers, starter: TierStarter) -> None:
        duration = self.config.duration_s
        kills = sorted(
            self.rng.uniform(0.1, 0.85) * duration for _ in range(self.settings.kill_workers)
        )
        # Drawn after the kills, so that a seed kills workers at the same moments with or
        # without server restarts.
        server_restarts = sorted(
            self.rng.uniform(0.1, 0.85) * duration for _ in range(self.settings.restart_servers)
        )
        mode = tiers.mode
        # A background mode's "broker" is its servers' memory: they crash instead.
        has_broker = mode is not None and mode.sends_after_reply
        restart_at = 0.5 * duration if self.settings.restart_broker and has_broker else None
        self.plan = _Plan(kills, restart_at, server_restarts)
        self._starter = starter

    # -- called every 0.2 s while the load runs ----------------------------------------
    def tick(self, tiers: Tiers, elapsed: float) -> None:
        plan, starter = self.plan, self._starter
        assert starter is not None
        for what in starter.replace_exited_workers(tiers):  # not killed by us: a crash
            self._event(elapsed, "crash", what)
        while plan.kills and plan.kills[0] <= elapsed:
            plan.kills.pop(0)
            self._kill_a_worker(tiers, elapsed)
        while plan.server_restarts and plan.server_restarts[0] <= elapsed:
            plan.server_restarts.pop(0)
            self._restart_a_server(tiers, elapsed)
        if plan.restart_at is not None and plan.restart_at <= elapsed:
            plan.restart_at = None
            # In this thread, though a RabbitMQ restart takes ~10 s (kills due meanwhile
            # follow it): a broker started from a helper thread would not die with the
            # harness, because the kernel ties PDEATHSIG to the thread that forks.
            self._restart_broker(tiers, elapsed)

    def before_drain(self, tiers: Tiers) -> None:
        # What the load ended too soon for still happens, before the drain.
        plan = self.plan
        while plan.kills:
            self._kill_a_worker(tiers, plan.kills.pop(0))
        while plan.server_restarts:
            self._restart_a_server(tiers, plan.server_restarts.pop(0))

    def after_mode(self, result: ModeResult, raw: Path, fake: FakegunAdmin) -> None:
        events = [e.as_json() for e in self.plan.events]
        (raw / "chaos-events.json").write_text(json.dumps(events, indent=1))
        kinds = Counter(e.kind for e in self.plan.events)
        killed, restarted, crashed = kinds["kill"], kinds["restart"], kinds["crash"]
        servers = kinds["server-restart"]
        result.notes.append(
            f"chaos: {killed} workers killed, broker restarted {restarted} time(s), "
            f"{servers} servers restarted, {crashed} workers exited by themselves"
        )
        result.notes.extend(f"chaos: {e.what}" for e in self.plan.events if e.kind == "skip")
        stats = json.loads((raw / FAKEGUN_STATS).read_text())
        faults = ", ".join(f"{n} × {kind}" for kind, n in sorted(stats["faults"].items()))
        result.notes.append(
            f"API: {stats['received']} calls, faults injected: {faults or 'none'}, "
            f"rate-limited {stats.get('rate_limited', 0)}, idempotent replays "
            f"{stats.get('replayed', 0)}"
        )

    def _kill_a_worker(self, tiers: Tiers, elapsed: float) -> None:
        starter = self._starter
        if not tiers.workers or starter is None:
            return
        victim = self.rng.choice(tiers.workers)
        tiers.workers.remove(victim)
        starter.children.kill(victim)
        replacement = starter.start_worker(tiers)
        self._event(elapsed, "kill", f"SIGKILL worker {victim.name}; started {replacement.name}")

    def _restart_a_server(self, tiers: Tiers, elapsed: float) -> None:
        starter = self._starter
        if not tiers.servers or starter is None:
            return
        victim = self.rng.choice(tiers.servers)
        started = time.monotonic()
        self._event(elapsed, "server-kill", f"SIGKILL {victim.name}")
        replacement = starter.restart_server(tiers, victim)
        took = time.monotonic() - started
        self._event(
            elapsed + took,  # when the new one answered
            "server-restart",
            f"restarted {victim.name} as {replacement.name}, answering after {took:.1f} s",
        )

    def _restart_broker(self, tiers: Tiers, elapsed: float) -> None:
        starter, mode = self._starter, tiers.mode
        assert starter is not None and mode is not None
        started = time.monotonic()
        if mode.service is None:
            # No broker process: the processes writing the queue's file crash instead.
            for server in list(tiers.servers):
                starter.children.kill(server)
                tiers.servers.remove(server)
            starter.start_servers(tiers)
            what = f"restarted the {mode.name} servers (SIGKILL, then started again)"
        elif not (broker := BROKERS[mode.service]).keeps_data:
            # Its jobs would be gone with its memory: a loss of the broker's making that
            # says nothing of the queue's code, so neither made nor counted.
            self._event(
                elapsed,
                "skip",
                f"broker restart skipped: {broker.title} keeps its queues in memory alone, "
                "so a restart would empty them (not counted as loss)",
            )
            return
        else:
            self.services.restart(mode.service)
            what = f"restarted {mode.service} (crashed, then started on its data)"
        self._event(elapsed, "restart", f"{what} in {time.monotonic() - started:.1f} s")

    def _event(self, elapsed: float, kind: str, what: str) -> None:
        self.plan.events.append(Event(elapsed, kind, what))
        print(f"  chaos at {elapsed:5.1f} s: {what}", flush=True)


def short_lease(url: str, parameter: str | None) -> str:
    """The queue URL with its lease or visibility ``parameter`` set to :data:`LEASE_S`."""
    if parameter is None:  # the broker notices a dead worker at once
        return url
    # Not urlunsplit: it would turn sqlite:////abs/path into a relative path.
    return f"{url}{'&' if '?' in url else '?'}{parameter}={LEASE_S:g}"


def accounting_table(results: list[ModeResult]) -> str:
    header = ["backend", *COLUMNS, "verdict"]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for result in results:
        row = result.accounting.as_row()
        lines.append(
            " | ".join([result.mode, *(str(row[c]) for c in COLUMNS), result.accounting.verdict])
        )
    return "\n".join(f"| {line} |" for line in lines)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--modes",
        default=",".join(QUEUED),
        help=f"modes to break (default: {','.join(QUEUED)}; frameworks: every task-queue "
        "framework's modes; shortcuts: background and naive; an in-request mode only with "
        "--restart-servers)",
    )
    add("--duration", type=float, default=60, help="seconds of load per mode (default: 60)")
    add("--users", type=int, default=20, help="Locust users posting the form (default: 20)")
    add(
        "--kill-workers",
        type=int,
        help="workers SIGKILLed per mode (default: 5 where there are workers, else 0)",
    )
    add(
        "--restart-broker",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="crash and restart the broker half-way (default: on)",
    )
    add(
        "--restart-servers",
        type=int,
        default=0,
        metavar="N",
        help="server processes SIGKILLed and started again per mode, as a deploy replaces "
        "them (default: 0; needs --server-procs 2 or more)",
    )
    # The default rate limit is below the load's ~50 sends/s.
    add_fault_arguments(parser, faults=DEFAULT_FAULTS, rate_limit="40")
    add("--server-procs", type=int, default=1, help="server processes sharing the port")
    add("--worker-procs", type=int, default=2, help="worker processes (default: 2)")
    add("--concurrency", type=int, default=50, help="API calls in flight per worker (default: 50)")
    add("--latency", default="uniform:0.05,0.2", help="fake Mailgun latency (default: fast)")
    add("--seed", type=int, default=1)
    add("--out", type=Path, default=Path("results"), help="results root folder")
    add_service_arguments(parser, dir_flag="--services-dir", per_run=True)
    add_target_arguments(parser)


def cli_main(args: argparse.Namespace) -> int:
    target = target_from_args(args)
    modes = (target.name,) if target is not None else parse_modes(args.modes)
    has_workers = (
        bool(target.worker_cmd)
        if target is not None
        else any(mode_named(m).worker is not None for m in modes)
    )
    kill_workers = args.kill_workers if args.kill_workers is not None else 5 * has_workers
    check_chaos_args(args, target, modes, kill_workers, has_workers)
    config = RunConfig(
        modes=modes,
        scenario="sender",
        users=args.users,
        spawn_rate=args.users,
        duration_s=args.duration,
        latency=args.latency,
        seed=args.seed,
        out=args.out,
        server_procs=args.server_procs,
        worker_procs=args.worker_procs,
        worker_concurrency=args.concurrency,
        fake_options=fake_options(args),
        target=target,
    )
    config = replace(config, run_id=f"{config.run_id}-chaos")
    services_settings = settings_from_args(args)
    restart_broker = args.restart_broker and target is None  # a target's broker is not ours
    if restart_broker:
        for mode in modes:
            service = mode_named(mode).service
            if (
                service is not None
                and BROKERS[service].keeps_data
                and services_settings.url_from_env(service)
            ):
                raise ConfigError(
                    f"chaos restarts the {service} broker, so it must start its own: unset "
                    f"{ENV_VARS[service]} (or pass --no-restart-broker)."
                )
    chaos = ChaosSettings(kill_workers, restart_broker, args.seed, args.restart_servers)
    where = f"target {target.url}" if target is not None else ", ".join(modes)
    print(
        f"mailbench chaos {config.run_id}: {where}; {args.duration:.0f} s each, "
        f"{kill_workers} worker kills, {args.restart_servers} server restarts, broker restart "
        f"{'on' if restart_broker else 'off'}, API faults {args.api_faults or 'none'}, rate "
        f"limit {args.rate_limit or 'none'}, idempotency {'on' if args.idempotency else 'off'}",
        flush=True,
    )
    results = drive(config, services_settings, lambda services: Chaos(chaos, config, services))
    table = accounting_table(results)
    (config.run_dir / "chaos.md").write_text(
        f"# Chaos run {config.run_id}\n\n{table}\n\n"
        + "\n".join(f"- {r.mode}: {'; '.join(r.notes)}" for r in results)
        + "\n"
    )
    print(f"\n{table}\n\nresults in {config.run_dir}/ (chaos.md, report.md)", flush=True)
    warn_unsound(results)
    return 0 if all(r.accounting.sound for r in results) else 1


def check_chaos_args(
    args: argparse.Namespace,
    target: Target | None,
    modes: tuple[str, ...],
    kill_workers: int,
    has_workers: bool,
) -> None:
    """One sentence for each way the options cannot break anything, or not as asked."""
    if kill_workers < 0 or args.worker_procs < 1 or args.server_procs < 1 or args.duration < 10:
        raise ConfigError(
            "--kill-workers ≥ 0, --worker-procs ≥ 1, --server-procs ≥ 1 and --duration ≥ 10 s"
        )
    if args.restart_servers < 0:
        raise ConfigError("--restart-servers takes a number of restarts, 0 or more")
    if args.restart_servers and args.server_procs < 2:
        raise ConfigError(
            f"--restart-servers {args.restart_servers} needs --server-procs 2 or more, so that "
            "another server takes the sends while one restarts: add --server-procs 2."
        )
    if kill_workers and not has_workers:
        what = "the target has no --worker-cmd" if target else f"{', '.join(modes)} has no workers"
        raise ConfigError(f"--kill-workers {kill_workers}: {what}, so no worker to kill.")
    if target is not None:
        if not (target.server_cmd or target.worker_cmd):
            raise ConfigError(
                "chaos breaks only processes it started: give the target's --server-cmd "
                "and/or --worker-cmd."
            )
        if args.restart_servers and not target.server_cmd:
            raise ConfigError(
                "--restart-servers restarts the target's servers that chaos started: give "
                "--server-cmd."
            )
        return
    if unbroken := [
        m for m in modes if not mode_named(m).sends_after_reply and not args.restart_servers
    ]:
        raise ConfigError(
            f"{', '.join(unbroken)} sends in the request, so chaos can only restart its servers: "
            "add --restart-servers N --server-procs 2 (or choose queued modes)."
        )
