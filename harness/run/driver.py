"""``mailbench run``: start everything, drive each mode with Locust, collect, report.

For each mode the harness starts fresh reference server processes (and, for queued
modes, worker processes), runs Locust headless as a subprocess for a fixed duration,
drains the queue, stops everything and reconciles the sends Locust saw accepted with
the fake Mailgun's ledger. With ``--target URL`` it drives a server it did not start
instead, through the same scenarios and the same accounting. Locust runs in its own
process because importing it monkey-patches the interpreter with gevent.

The command line is in :mod:`harness.run.cli`.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from harness.errors import ProcessFailed
from harness.process import Child, Children, free_port, mailbench_command
from harness.results import machine
from harness.results.accounting import Accounting, reconcile
from harness.results.collect import client_sends, collect_mode, dead_lettered_recipients
from harness.results.folder import ModeResult, write_manifest, write_results
from harness.run.sweep import SweepSettings, sweep_mode
from harness.run.target import Target
from queues import open_queue
from servers.app import MODES, QUEUED_MODES

log = logging.getLogger(__name__)

SCENARIOS_DIR = Path(__file__).resolve().parent.parent / "scenarios"
SCENARIOS = ("mixed", "reader", "sender")
# The closed-model user classes of each scenario; every scenario also has ``Arrivals``.
CLOSED_USERS = {"mixed": ("Reader", "Sender"), "reader": ("Reader",), "sender": ("Sender",)}
DEFAULT_LATENCY = "uniform:0.5,1.0"
DEFAULT_MODES = MODES


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    duration_s: float
    users: int
    spawn_rate: float
    worker_concurrency: int
    drain_timeout_s: float


PROFILES = {
    # ~30 s per mode: a first answer in minutes, with enough sends for stable medians.
    "quick": Profile(
        "quick", duration_s=20, users=50, spawn_rate=50, worker_concurrency=200, drain_timeout_s=60
    ),
    # The quick run, then a load sweep per mode up to its knee (≤ 15 min for six modes).
    "full": Profile(
        "full", duration_s=20, users=50, spawn_rate=50, worker_concurrency=200, drain_timeout_s=120
    ),
}


@dataclass(frozen=True, slots=True)
class RunConfig:
    modes: tuple[str, ...] = DEFAULT_MODES
    profile: str = "quick"
    scenario: str = "mixed"
    users: int = 50
    rate: float | None = None  # open model: visits started per second, instead of users
    arrivals: str = "poisson"
    max_in_flight: int = 1000
    sweep: bool = False  # after the main phase, raise an open-model load to the knee
    spawn_rate: float = 50
    duration_s: float = 20
    latency: str = DEFAULT_LATENCY
    seed: int = 1
    out: Path = Path("results")
    locust_processes: int = 0  # 0: one Locust process; N: Locust's --processes N
    server_procs: int = 1  # server processes sharing one port (SO_REUSEPORT)
    worker_procs: int = 1  # worker processes per queued mode
    worker_concurrency: int = 200
    render_ms: float = 0.0  # CPU work per email: in the handler (direct), else the worker
    drain_timeout_s: float = 60
    send_delay_ms: float = 0.0
    fake_options: tuple[str, ...] = ()  # extra `mailbench fakegun` options (faults...)
    target: Target | None = None  # an external server instead of the reference ones
    # Tier ("fakegun", "server", "worker", "locust") -> CPUs it may run on; absent: any.
    cpus: tuple[tuple[str, tuple[int, ...]], ...] = ()
    nice: tuple[tuple[str, int], ...] = ()  # tier -> CPU priority (nice value); absent: 0
    run_id: str = field(default_factory=lambda: dt.datetime.now().strftime("%Y%m%d-%H%M%S"))

    @property
    def run_dir(self) -> Path:
        return self.out / self.run_id

    @property
    def load_model(self) -> str:
        if self.rate:
            return f"open, {self.rate:g}/s {self.arrivals} arrivals ({self.scenario})"
        return f"closed, {self.users} users ({self.scenario})"

    def describe(self) -> dict[str, Any]:
        described = asdict(self)
        described["out"] = str(self.out)
        described["load_model"] = self.load_model
        described["target"] = self.target.describe() if self.target else None
        described["cpus"] = {tier: list(cpus) for tier, cpus in self.cpus}
        described["nice"] = dict(self.nice)
        return described

    def cpus_of(self, tier: str) -> tuple[int, ...] | None:
        return dict(self.cpus).get(tier)


QueueUrlFor = Callable[[str], str | None]


@dataclass
class Tiers:
    """The processes serving one mode: servers behind one port, and workers."""

    mode: str
    raw: Path
    base_url: str
    port: int
    queue_url: str | None
    queue_name: str
    servers: list[Child] = field(default_factory=list)
    workers: list[Child] = field(default_factory=list)
    started: dict[str, int] = field(default_factory=lambda: {"server": 0, "worker": 0})

    def next_index(self, kind: str) -> int:
        """A number per process started, so a replacement never overwrites a file."""
        index = self.started[kind]
        self.started[kind] += 1
        return index


class Harness:
    def __init__(self, config: RunConfig, children: Children, queue_url_for: QueueUrlFor) -> None:
        self.config = config
        self.children = children
        self.queue_url_for = queue_url_for
        self.run_dir = config.run_dir
        self.fake_url = ""
        self.show_progress = sys.stdout.isatty()
        # Several server processes check each other's CSRF tokens: one secret for all.
        self.secret = secrets.token_urlsafe(32)
        self.on_tick: Callable[[Tiers, float], None] | None = None  # called during load
        self.results: list[ModeResult] = []  # the modes finished so far

    # -- the whole run -------------------------------------------------------------------
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
        write_manifest(self.run_dir, manifest)
        self._start_fake()
        results = self.results
        for mode in cfg.modes:
            queue_url = None
            if cfg.target is None and mode in QUEUED_MODES:
                queue_url = self.queue_url_for(mode)
                if queue_url is None:
                    manifest["modes"][mode] = {"skipped": "broker unavailable"}
                    continue
            result = self.run_mode(mode, queue_url)
            results.append(result)
            manifest["modes"][mode] = {
                "duration_s": result.duration_s,
                "notes": result.notes,
                "generator": result.generator,
            }
            write_results(self.run_dir, results)
        manifest["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        write_manifest(self.run_dir, manifest)
        return results

    def _start_fake(self) -> None:
        cfg = self.config
        if cfg.target is not None and cfg.target.fakegun_url:
            self.fake_url = cfg.target.fakegun_url.rstrip("/")  # one the user runs
            httpx.get(f"{self.fake_url}/_mailbench/stats", timeout=10).raise_for_status()
            return
        port = cfg.target.fakegun_port if cfg.target is not None else free_port()
        fake = self.children.start(
            "fakegun",
            mailbench_command(
                "fakegun",
                "--port",
                str(port),
                "--latency",
                cfg.latency,
                "--seed",
                str(cfg.seed),
                *cfg.fake_options,
            ),
            self.run_dir / "logs" / "fakegun.log",
        )
        self._pin(fake, "fakegun")
        self.fake_url = f"http://127.0.0.1:{port}"
        fake.wait_http(f"{self.fake_url}/_mailbench/stats")

    # -- one mode ------------------------------------------------------------------------
    def run_mode(self, mode: str, queue_url: str | None) -> ModeResult:
        cfg = self.config
        raw = self.run_dir / "raw" / mode
        raw.mkdir(parents=True, exist_ok=True)
        httpx.post(f"{self.fake_url}/_mailbench/reset", timeout=10).raise_for_status()
        tiers = self.start_tiers(mode, queue_url, raw)

        started = time.time()
        self._run_locust(tiers, raw)
        duration = time.time() - started
        notes: list[str] = []
        sweep: list[dict[str, Any]] = []
        if cfg.sweep:

            def step(rate: float, seconds: float, folder: Path) -> None:
                self._run_locust(tiers, folder, rate=rate, duration=seconds, sample_depth=False)

            sweep = sweep_mode(mode, SweepSettings(), raw / "sweep", step)
        if not self.drain(tiers):
            notes.append(f"not drained within {self.drain_timeout:.0f} s")
        notes += self.stop_tiers(tiers)
        result = self._collect(mode, raw, duration, notes)
        result.sweep = sweep
        return result

    @property
    def drain_timeout(self) -> float:
        return self.config.drain_timeout_s

    def start_tiers(self, mode: str, queue_url: str | None, raw: Path) -> Tiers:
        cfg = self.config
        if cfg.target is not None:
            url = cfg.target.url.rstrip("/")
            return Tiers(mode, raw, url, 0, None, "")
        port = free_port()
        # A queue of its own per run and mode: jobs left on a shared broker by an earlier,
        # interrupted run can never be counted in this one.
        queue_name = f"mailbench-{cfg.run_id}-{mode}"
        tiers = Tiers(mode, raw, f"http://127.0.0.1:{port}", port, queue_url, queue_name)
        for _ in range(cfg.server_procs):
            self.start_server(tiers)
        for server in tiers.servers:
            server.wait_http(f"{tiers.base_url}/")
        if queue_url:
            for _ in range(cfg.worker_procs):
                self.start_worker(tiers)
        return tiers

    def start_server(self, tiers: Tiers) -> Child:
        cfg = self.config
        index = tiers.next_index("server")
        args = ["serve", "--mode", tiers.mode, "--port", str(tiers.port)]
        args += ["--mailgun-url", self.fake_url]
        args += ["--metrics-out", str(tiers.raw / f"server-{index}.json")]
        if cfg.server_procs > 1:
            args.append("--reuse-port")
        if tiers.queue_url:
            args += ["--queue-url", tiers.queue_url, "--queue-name", tiers.queue_name]
        if cfg.send_delay_ms:
            args += ["--inject-send-delay-ms", str(cfg.send_delay_ms)]
        if cfg.render_ms and tiers.mode not in QUEUED_MODES:
            args += ["--render-ms", f"{cfg.render_ms:g}"]
        server = self.children.start(
            f"server {index} ({tiers.mode})",
            mailbench_command(*args),
            self.run_dir / "logs" / f"{tiers.mode}-server-{index}.log",
            env={"MAILBENCH_SECRET": self.secret},
        )
        self._pin(server, "server")
        tiers.servers.append(server)
        return server

    def start_worker(self, tiers: Tiers) -> Child:
        cfg = self.config
        assert tiers.queue_url is not None
        index = tiers.next_index("worker")
        args = ["worker", "--backend", tiers.queue_url, "--queue-name", tiers.queue_name]
        args += ["--concurrency", str(cfg.worker_concurrency), "--mailgun-url", self.fake_url]
        args += ["--metrics-out", str(tiers.raw / f"worker-{index}.json")]
        args += ["--dead-letters-out", str(tiers.raw / f"dead-letters-{index}.jsonl")]
        if cfg.render_ms:
            args += ["--render-ms", f"{cfg.render_ms:g}"]
        worker = self.children.start(
            f"worker {index} ({tiers.mode})",
            mailbench_command(*args),
            self.run_dir / "logs" / f"{tiers.mode}-worker-{index}.log",
        )
        self._pin(worker, "worker")
        tiers.workers.append(worker)
        return worker

    def _pin(self, child: Child, tier: str) -> None:
        """Keep a tier on its CPUs (``--cpus``) and at its priority (``--nice``), as if it
        had a machine of its own, or only the CPU time the others leave."""
        cpus = self.config.cpus_of(tier)
        if cpus is not None:
            os.sched_setaffinity(child.pid, cpus)
        nice = dict(self.config.nice).get(tier)
        if nice is not None:
            # Threads it starts later inherit the value (Linux keeps it per thread).
            os.setpriority(os.PRIO_PROCESS, child.pid, nice)

    def stop_tiers(self, tiers: Tiers) -> list[str]:
        """Stop workers, then servers (each writes its metrics); notes on bad exits."""
        notes = []
        for worker in tiers.workers:
            if self.children.stop(worker, timeout=30) not in (0, None):
                notes.append(f"{worker.name} exited with code {worker.process.returncode}")
        for server in tiers.servers:
            self.children.stop(server, timeout=30)
        tiers.workers.clear()
        tiers.servers.clear()
        return notes

    def _locust_argv(
        self, base_url: str, raw: Path, rate: float | None, duration: float
    ) -> list[str]:
        cfg = self.config
        argv = [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(SCENARIOS_DIR / f"{cfg.scenario}.py"),
            "--headless",
            "--only-summary",
            "--host",
            base_url,
            "--run-time",
            f"{int(duration)}s",
            "--stop-timeout",
            # Closed users finish their visit, so every accepted send is counted; an open
            # schedule never finishes and counts what it leaves unfinished instead.
            "2" if rate else "5",
            "--hdr-out",
            str(raw),
            "--csv",
            str(raw / "locust"),
            "--json-file",
            str(raw / "locust-final"),
            "--exit-code-on-error",
            "0",
            "--loglevel",
            "WARNING",
        ]
        if cfg.target is not None:
            argv += cfg.target.locust_options()
        if rate:
            argv += ["Arrivals", "--users", "1", "--spawn-rate", "1"]
            argv += ["--arrival-rate", f"{rate:g}", "--arrival-process", cfg.arrivals]
            argv += ["--arrival-seed", str(cfg.seed), "--max-in-flight", str(cfg.max_in_flight)]
        else:
            argv += [*CLOSED_USERS[cfg.scenario], "--users", str(cfg.users)]
            argv += ["--spawn-rate", f"{cfg.spawn_rate:g}"]
            if cfg.locust_processes:
                # The master listens for its workers on loopback only.
                argv += ["--processes", str(cfg.locust_processes)]
                argv += ["--master-bind-host", "127.0.0.1"]
        return argv

    def _run_locust(
        self,
        tiers: Tiers,
        raw: Path,
        rate: float | None = None,
        duration: float | None = None,
        sample_depth: bool = True,
    ) -> None:
        cfg = self.config
        mode = tiers.mode
        rate = cfg.rate if rate is None else rate
        duration = cfg.duration_s if duration is None else duration
        raw.mkdir(parents=True, exist_ok=True)
        locust = self.children.start(
            f"locust ({mode})",
            self._locust_argv(tiers.base_url, raw, rate, duration),
            self.run_dir / "logs" / f"{mode}-locust.log",
        )
        self._pin(locust, "locust")  # before it forks any --processes workers
        deadline = time.monotonic() + duration + 60
        started = time.monotonic()
        depths: dict[str, int | None] = {}
        next_second = started
        while locust.alive():
            if time.monotonic() > deadline:
                self.children.stop(locust)
                raise ProcessFailed(
                    f"Locust did not finish the {mode} run in time; see {locust.log_path}"
                )
            time.sleep(0.2)
            elapsed = time.monotonic() - started
            if self.on_tick is not None:
                self.on_tick(tiers, elapsed)
            if time.monotonic() < next_second:
                continue
            next_second += 1.0
            self._progress(mode, duration - elapsed, raw)
            if sample_depth and tiers.queue_url:
                depths[str(int(time.time()))] = _depth(tiers.base_url)
        self._end_progress()
        if depths:
            (raw / "depth.json").write_text(json.dumps(depths))
        code = self.children.stop(locust)
        if code not in (0, None) or not (raw / "locust-hdr.json").is_file():
            raise ProcessFailed(
                f"Locust failed in mode {mode} (exit code {code}); "
                f"its log ends with:\n{locust.tail()}"
            )

    def _progress(self, mode: str, left: float, raw: Path) -> None:
        rate, failures = _locust_rate(raw / "locust_stats.csv")
        line = f"[{mode:>8}] {max(0, left):4.0f} s left · {rate:7.0f} req/s · {failures} failures"
        if self.show_progress:
            print(f"\r{line}", end="", flush=True)
        elif int(left) % 5 == 0:
            print(line, flush=True)

    def _end_progress(self) -> None:
        if self.show_progress:
            print(flush=True)

    # -- after the load ------------------------------------------------------------------
    def drain(self, tiers: Tiers) -> bool:
        """Wait (bounded) until every accepted send reached the API or the dead letter and,
        with a queue, nothing is left in it (so late duplicates are seen too)."""
        return asyncio.run(self._drain_async(tiers))

    async def _drain_async(self, tiers: Tiers) -> bool:
        accepted, failed = client_sends(tiers.raw)
        deadline = time.monotonic() + self.drain_timeout
        queue = await open_queue(tiers.queue_url, tiers.queue_name) if tiers.queue_url else None
        # Sent inside the request, every email is in the ledger once nothing is lost. With a
        # queue (ours, or maybe a target's), wait until it is quiet twice in a row, so that
        # late redeliveries (and their duplicates) are counted too.
        polls_needed = 2 if queue is not None or self.config.target else 1
        settled_polls = 0
        previous_ledger = -1
        try:
            async with httpx.AsyncClient(timeout=60) as http:
                while True:
                    response = await http.get(f"{self.fake_url}/_mailbench/ledger")
                    ledger = response.json()["entries"]
                    dead = dead_lettered_recipients(tiers.raw)
                    counts, _ = reconcile(accepted, ledger, dead, failed)
                    # Not depth() alone: a broker may not count what another process holds
                    # unacknowledged (RabbitMQ); only outcomes prove the drain.
                    depth = await queue.depth() if queue is not None else None
                    if queue is not None:
                        quiet = depth == 0
                    else:  # nothing to ask: the ledger has stopped growing
                        quiet = polls_needed == 1 or len(ledger) == previous_ledger
                    previous_ledger = len(ledger)
                    settled_polls = settled_polls + 1 if counts.lost == 0 and quiet else 0
                    if settled_polls >= polls_needed:
                        return True
                    if time.monotonic() > deadline:
                        return False
                    self._drain_progress(tiers.mode, counts, depth)
                    await asyncio.sleep(1.0)
        finally:
            if queue is not None:
                await queue.close()

    def _drain_progress(self, mode: str, counts: Accounting, depth: int | None) -> None:
        queued = f"{depth} jobs queued, " if depth is not None else ""
        print(
            f"[{mode:>8}] draining: {queued}{counts.delivered + counts.dead_lettered}"
            f"/{counts.accepted} delivered or dead-lettered",
            flush=True,
        )

    def _collect(self, mode: str, raw: Path, duration: float, notes: list[str]) -> ModeResult:
        ledger = httpx.get(f"{self.fake_url}/_mailbench/ledger", timeout=60).json()["entries"]
        (raw / "ledger.json").write_text(json.dumps(ledger))
        return collect_mode(mode, raw, duration, ledger, notes)


def _depth(base_url: str) -> int | None:
    try:
        return int(httpx.get(f"{base_url}/_mailbench/depth", timeout=2).json()["depth"])
    except (httpx.HTTPError, KeyError, ValueError):
        return None


def _locust_rate(stats_csv: Path) -> tuple[float, int]:
    try:
        with stats_csv.open(newline="") as f:
            for row in csv.DictReader(f):
                if row.get("Name") == "Aggregated":
                    return float(row.get("Requests/s") or 0), int(row.get("Failure Count") or 0)
    except (OSError, ValueError):
        pass
    return 0.0, 0
