"""``mailbench run``'s orchestration: the fake, then each mode in turn, then the results.

For each mode the driver starts fresh server processes (and, for queued modes, worker
processes: :mod:`harness.run.tiers`), runs Locust for a fixed duration
(:mod:`harness.run.locust`), runs the load sweep if asked (:mod:`harness.run.sweep`),
drains (:mod:`harness.run.drain`), stops everything and reconciles the sends Locust saw
accepted with the fake Mailgun's ledger (:mod:`harness.results.collect`). With
``--target URL`` it drives a server it did not start instead, through the same
scenarios and the same accounting.

A mode's run has phases whose figures stay apart (:mod:`harness.run.phases`): the
warm-up, the main load and each sweep step. The main load is drained before the sweep
starts and each step before the next, so every API call and delivery belongs to the
phase whose sends caused it.

What varies between a plain run and ``mailbench chaos`` is a :class:`Hooks` object
passed in: chaos shortens leases, breaks things while the load runs and adds notes;
the driver itself never knows it.

The command line is in :mod:`harness.run.cli`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.errors import MailbenchError
from harness.process import Children, mailbench_command, wait_ready
from harness.results import machine
from harness.results.collect import collect_mode, framework_worker
from harness.results.folder import ModeResult, write_manifest, write_results
from harness.results.rows import SweepRow
from harness.run.calibrate import measure_floor
from harness.run.config import RunConfig
from harness.run.drain import drain
from harness.run.locust import LocustRun
from harness.run.phases import PhaseClock
from harness.run.sweep import SweepSettings, sweep_mode
from harness.run.tiers import Tiers, TierStarter, pin, redelivery_s
from harness.services.settings import ServiceSettings
from servers.fakegun.admin import FakegunAdmin
from servers.modes import mode as mode_named

log = logging.getLogger(__name__)

FAKEGUN_STATS = "fakegun-stats.json"  # the fake's counters, per mode
QueueUrlFor = Callable[[str], str | None]  # mode name -> its queue URL (None: skip it)


class Hooks:
    """What a kind of run adds to the plain one; every method here does nothing."""

    def queue_url(self, url: str, mode: str) -> str:
        """The queue URL the mode's processes get."""
        return url

    def drain_timeout(self, configured: float) -> float:
        return configured

    def before_load(self, tiers: Tiers, starter: TierStarter) -> None:
        """The mode's processes are up; the load starts next."""

    def tick(self, tiers: Tiers, elapsed: float) -> None:
        """Called every 0.2 s while the load runs."""

    def before_drain(self, tiers: Tiers) -> None:
        """The load is over; the drain starts next."""

    def after_mode(self, result: ModeResult, raw: Path, fake: FakegunAdmin) -> None:
        """The mode's processes are stopped and its figures collected."""


class Driver:
    def __init__(
        self,
        config: RunConfig,
        children: Children,
        queue_url_for: QueueUrlFor,
        hooks: Hooks | None = None,
        sweep: SweepSettings | None = None,
        services: ServiceSettings | None = None,
    ) -> None:
        self.config = config
        self.children = children
        self.queue_url_for = queue_url_for
        self.hooks = hooks or Hooks()
        self.sweep = sweep or SweepSettings()
        self.services = services  # the brokers' settings, for sampling a queue's depth
        self._phases: PhaseClock | None = None  # the mode's phases, while it runs
        self._starter: TierStarter | None = None
        self._replaced: list[str] = []  # the mode's workers that died and were replaced
        self.run_dir = config.run_dir
        self.fake: FakegunAdmin | None = None
        self.results: list[ModeResult] = []  # the modes finished so far

    def run(self) -> list[ModeResult]:
        cfg = self.config
        started = dt.datetime.now(dt.UTC)
        manifest: dict[str, Any] = {
            "run_id": cfg.run_id,
            "started_at": started.isoformat(timespec="seconds"),
            "git_commit": machine.git_commit(Path(__file__).parent),
            "versions": machine.versions(),
            "machine": machine.machine(),
            "config": cfg.describe(),
            "modes": {},
        }
        if cfg.target is not None and not cfg.target.server_cmd:
            cfg.target.check_form_page()  # a dead target is one sentence, not a run of failures
        write_manifest(self.run_dir, manifest)
        fake = self.fake = self._start_fake()
        manifest["fakegun"] = {"url": fake.url}
        manifest["generator_floor_us"] = self._measure_floor()
        starter = TierStarter(cfg, self.children, fake.url, secrets.token_urlsafe(32))
        self._starter = starter
        locust = LocustRun(cfg, self.children, self._tick, self.services)
        for name in cfg.modes:
            queue_url = None
            if cfg.target is None and mode_named(name).queued:
                queue_url = self.queue_url_for(name)
                if queue_url is None:
                    manifest["modes"][name] = {"skipped": "broker unavailable"}
                    continue
                queue_url = self.hooks.queue_url(queue_url, name)
            result = self._run_mode(name, queue_url, fake, starter, locust)
            self.results.append(result)
            manifest["modes"][name] = {
                "duration_s": result.duration_s,
                "notes": result.notes,
                "generator": result.generator,
            }
            if (framework := framework_worker(self.run_dir / "raw" / name)) is not None:
                manifest["modes"][name]["framework"] = framework
            write_results(self.run_dir, self.results)
        manifest["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        write_manifest(self.run_dir, manifest)
        return self.results

    def _measure_floor(self) -> dict[str, Any] | None:
        """What the load generator adds to every request under this run's load, for the
        report to say (:func:`harness.run.calibrate.measure_floor`); a sample that fails
        is a warning, not a failed run."""
        try:
            floor = measure_floor(self.config, self.children)
        except MailbenchError as exc:
            print(f"WARNING: the generator's floor was not measured: {exc}", file=sys.stderr)
            return None
        print(
            f"generator floor: {floor['p50']} µs p50, {floor['p99']} µs p99 "
            f"(a 0 ms page, {floor['samples']} requests)",
            flush=True,
        )
        return floor

    def _start_fake(self) -> FakegunAdmin:
        cfg = self.config
        if cfg.target is not None and cfg.target.fakegun_url:
            fake = FakegunAdmin(cfg.target.fakegun_url)  # one the user runs
            fake.stats()
            return fake
        # A target sends to a port it was configured with; our own servers are told the
        # fake's URL, so it takes any free port (0) and says which one it got.
        port = cfg.target.fakegun_port if cfg.target is not None else 0
        port_file = self.run_dir / "logs" / "fakegun.port"
        port_file.unlink(missing_ok=True)
        argv = ["fakegun", "--port", str(port), "--port-file", str(port_file)]
        argv += ["--latency", cfg.latency, "--seed", str(cfg.seed)]
        child = self.children.start(
            "fakegun",
            mailbench_command(*argv, *cfg.fake_options),
            self.run_dir / "logs" / "fakegun.log",
        )
        pin(cfg, child, "fakegun")
        if port == 0:
            port = child.wait_port_file(port_file)
        fake = FakegunAdmin(f"http://127.0.0.1:{port}")
        instead = "pass --fakegun-port 0 for any free port"
        if cfg.target is not None:
            instead += ", or --fakegun-url to send to the fake already there"
        wait_ready([child], fake.identity, port, what_to_do=f"stop it, or {instead}")
        if cfg.target is not None:
            print(f"fake Mailgun at {fake.url}: the target must send there", flush=True)
        return fake

    def _tick(self, tiers: Tiers, elapsed: float) -> None:
        """Every 0.2 s while a load runs: the hooks', the workers' supervision and the
        warm-up's end."""
        self.hooks.tick(tiers, elapsed)
        self._supervise(tiers)
        if self._phases is not None and self._phases.in_warmup and tiers.follow_phases:
            self._phases.watch_warmup(tiers.base_url)

    def _supervise(self, tiers: Tiers) -> int:
        """Replace the workers that exited by themselves (after the hooks, which may
        have done it and noted it their way); how many were."""
        if self._starter is None or not tiers.workers:
            return 0
        notes = self._starter.replace_exited_workers(tiers)
        for note in notes:
            print(f"[{tiers.name:>8}] {note}", flush=True)
        self._replaced += notes
        return len(notes)

    def _run_mode(
        self,
        name: str,
        queue_url: str | None,
        fake: FakegunAdmin,
        starter: TierStarter,
        locust: LocustRun,
    ) -> ModeResult:
        cfg = self.config
        raw = self.run_dir / "raw" / name
        raw.mkdir(parents=True, exist_ok=True)
        fake.reset()
        # Before any process starts: each reads it at start.
        phases = self._phases = PhaseClock(raw, cfg.warmup_s)
        self._replaced = []
        if cfg.target is not None:
            tiers = starter.external(cfg.target, raw)
        else:
            tiers = starter.start(mode_named(name), queue_url, raw)
        self.hooks.before_load(tiers, starter)

        started = time.time()
        locust.run(tiers, raw)
        duration = time.time() - started
        notes: list[str] = []
        if phases.in_warmup and tiers.follow_phases:
            notes.append(
                "the server never reported a first request: its and its workers' "
                "histograms are all in warmup/"
            )
        self.hooks.before_drain(tiers)
        timeout = self.hooks.drain_timeout(cfg.drain_timeout_s)
        # Sent inside the request, every email is in the ledger once nothing is lost; with
        # a queue (ours, or maybe a target's), wait for two quiet polls in a row.
        # The same for a background mode's tasks in flight, which its servers count.
        backlog = tiers.queue_url or (tiers.mode is not None and tiers.mode.sends_after_reply)
        quiet_polls = 2 if backlog or cfg.target else 1

        grace = redelivery_s(tiers.mode, tiers.queue_url)

        def drained(what: str) -> None:
            if not drain(tiers, fake, timeout, quiet_polls, lambda: self._supervise(tiers), grace):
                notes.append(f"{what} not drained within {timeout:.0f} s")

        sweep: list[SweepRow] = []
        if cfg.sweep:
            drained("main load")  # its API calls and deliveries stay in its phase

            def step(rate: float, seconds: float, folder: Path) -> None:
                phases.begin(folder.relative_to(raw).as_posix())
                locust.run(tiers, folder, rate=rate, duration=seconds, sample_depth=False)
                drained(f"sweep step at {rate:g}/s")

            sweep = sweep_mode(name, self.sweep, raw / "sweep", step)
        else:
            drained("load")
        self._phases = None
        notes += self._replaced
        notes += starter.stop(tiers)
        ledger = fake.ledger()
        (raw / "ledger.json").write_text(json.dumps(ledger))
        # What the fake did wrong on purpose (faults, rate limit) and how often.
        (raw / FAKEGUN_STATS).write_text(json.dumps(fake.stats(), indent=1))
        result = collect_mode(name, raw, duration, ledger, notes, load_s=cfg.duration_s)
        result.sweep = sweep
        self.hooks.after_mode(result, raw, fake)
        return result
