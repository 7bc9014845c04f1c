"""``mailbench run``: start everything, drive each mode with Locust, collect, report.

For each mode the harness starts a fresh reference server (and, for queued modes, the
workers), runs Locust headless as a subprocess for a fixed duration, drains the queue,
stops everything and reconciles what the server accepted with the fake Mailgun's ledger.
Locust runs in its own process because importing it monkey-patches the interpreter
with gevent.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from harness import machine
from harness.collect import collect_mode
from harness.errors import ConfigError, MailbenchError, ProcessFailed, ServiceUnavailable
from harness.procs import Child, Children, free_port, mailbench_command
from harness.results import ModeResult, point_latest, write_manifest, write_results
from harness.services import Services, ServiceSettings
from harness.sweep import SweepSettings, sweep_mode
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
    worker_concurrency: int = 200
    drain_timeout_s: float = 60
    send_delay_ms: float = 0.0
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
        return described


QueueUrlFor = Callable[[str], str | None]


class Harness:
    def __init__(self, config: RunConfig, children: Children, queue_url_for: QueueUrlFor) -> None:
        self.config = config
        self.children = children
        self.queue_url_for = queue_url_for
        self.run_dir = config.run_dir
        self.fake_url = ""
        self.show_progress = sys.stdout.isatty()

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
        results = []
        for mode in cfg.modes:
            queue_url = self.queue_url_for(mode) if mode in QUEUED_MODES else None
            if mode in QUEUED_MODES and queue_url is None:
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
        port = free_port()
        fake = self.children.start(
            "fakegun",
            mailbench_command(
                "fakegun", "--port", str(port), "--latency", cfg.latency, "--seed", str(cfg.seed)
            ),
            self.run_dir / "logs" / "fakegun.log",
        )
        self.fake_url = f"http://127.0.0.1:{port}"
        fake.wait_http(f"{self.fake_url}/_mailbench/stats")

    # -- one mode ------------------------------------------------------------------------
    def run_mode(self, mode: str, queue_url: str | None) -> ModeResult:
        cfg = self.config
        raw = self.run_dir / "raw" / mode
        raw.mkdir(parents=True, exist_ok=True)
        logs = self.run_dir / "logs"
        httpx.post(f"{self.fake_url}/_mailbench/reset", timeout=10).raise_for_status()

        port = free_port()
        server_args = [
            "serve",
            "--mode",
            mode,
            "--port",
            str(port),
            "--mailgun-url",
            self.fake_url,
            "--metrics-out",
            str(raw / "server.json"),
        ]
        # A queue of its own per run and mode: jobs left on a shared broker by an earlier,
        # interrupted run can never be counted in this one.
        queue_name = f"mailbench-{cfg.run_id}-{mode}"
        if queue_url:
            server_args += ["--queue-url", queue_url, "--queue-name", queue_name]
        if cfg.send_delay_ms:
            server_args += ["--inject-send-delay-ms", str(cfg.send_delay_ms)]
        server = self.children.start(
            f"server ({mode})", mailbench_command(*server_args), logs / f"{mode}-server.log"
        )
        base_url = f"http://127.0.0.1:{port}"
        server.wait_http(f"{base_url}/")

        workers: list[Child] = []
        if queue_url:
            workers.append(
                self.children.start(
                    f"worker ({mode})",
                    mailbench_command(
                        "worker",
                        "--backend",
                        queue_url,
                        "--queue-name",
                        queue_name,
                        "--concurrency",
                        str(cfg.worker_concurrency),
                        "--mailgun-url",
                        self.fake_url,
                        "--metrics-out",
                        str(raw / "worker-0.json"),
                    ),
                    logs / f"{mode}-worker-0.log",
                )
            )

        started = time.time()
        self._run_locust(mode, base_url, raw, sample_depth=bool(queue_url))
        duration = time.time() - started
        notes: list[str] = []
        sweep: list[dict[str, Any]] = []
        if cfg.sweep:

            def step(rate: float, seconds: float, folder: Path) -> None:
                self._run_locust(mode, base_url, folder, False, rate=rate, duration=seconds)

            sweep = sweep_mode(mode, SweepSettings(), raw / "sweep", step)
        if queue_url:
            drained = self._drain(mode, queue_url, queue_name, server_url=base_url)
            if not drained:
                notes.append(f"queue not drained within {cfg.drain_timeout_s:.0f} s")
        for worker in workers:
            if self.children.stop(worker, timeout=30) not in (0, None):
                notes.append(f"{worker.name} exited with code {worker.process.returncode}")
        self.children.stop(server, timeout=30)
        result = self._collect(mode, raw, duration, notes)
        result.sweep = sweep
        return result

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
        if rate:
            argv += ["Arrivals", "--users", "1", "--spawn-rate", "1"]
            argv += ["--arrival-rate", f"{rate:g}", "--arrival-process", cfg.arrivals]
            argv += ["--arrival-seed", str(cfg.seed), "--max-in-flight", str(cfg.max_in_flight)]
        else:
            argv += [*CLOSED_USERS[cfg.scenario], "--users", str(cfg.users)]
            argv += ["--spawn-rate", f"{cfg.spawn_rate:g}"]
            if cfg.locust_processes:
                argv += ["--processes", str(cfg.locust_processes)]
        return argv

    def _run_locust(
        self,
        mode: str,
        base_url: str,
        raw: Path,
        sample_depth: bool,
        rate: float | None = None,
        duration: float | None = None,
    ) -> None:
        cfg = self.config
        rate = cfg.rate if rate is None else rate
        duration = cfg.duration_s if duration is None else duration
        raw.mkdir(parents=True, exist_ok=True)
        locust = self.children.start(
            f"locust ({mode})",
            self._locust_argv(base_url, raw, rate, duration),
            self.run_dir / "logs" / f"{mode}-locust.log",
        )
        deadline = time.monotonic() + duration + 60
        started = time.monotonic()
        depths: dict[str, int | None] = {}
        while locust.alive():
            if time.monotonic() > deadline:
                self.children.stop(locust)
                raise ProcessFailed(
                    f"Locust did not finish the {mode} run in time; see {locust.log_path}"
                )
            time.sleep(1.0)
            self._progress(mode, duration - (time.monotonic() - started), raw)
            if sample_depth:
                depths[str(int(time.time()))] = _depth(base_url)
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

    def _drain(self, mode: str, queue_url: str, queue_name: str, server_url: str) -> bool:
        """Wait (bounded) until the queue is empty and every accepted job reached the API
        or the dead letter."""
        accepted = len(httpx.get(f"{server_url}/_mailbench/metrics", timeout=30).json()["accepted"])
        return asyncio.run(self._drain_async(mode, queue_url, queue_name, accepted))

    async def _drain_async(self, mode: str, url: str, name: str, accepted: int) -> bool:
        deadline = time.monotonic() + self.config.drain_timeout_s
        queue = await open_queue(url, name)
        try:
            async with httpx.AsyncClient(timeout=30) as http:
                while True:
                    # Not depth() == 0: a broker may not count what another process holds
                    # unacknowledged (RabbitMQ), so only outcomes prove the drain.
                    depth = await queue.depth()
                    dead = await queue.dead_letters()
                    stats = (await http.get(f"{self.fake_url}/_mailbench/stats")).json()
                    delivered = int(stats["unique_keys"])
                    if delivered + dead >= accepted:
                        return True
                    if time.monotonic() > deadline:
                        return False
                    print(
                        f"[{mode:>8}] draining: {depth} jobs queued, "
                        f"{delivered}/{accepted} delivered",
                        flush=True,
                    )
                    await asyncio.sleep(1.0)
        finally:
            await queue.close()

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


# -- command line --------------------------------------------------------------------------
def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        help=f"comma-separated modes (default: {','.join(DEFAULT_MODES)})",
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--scenario", choices=SCENARIOS, default="mixed")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--users", type=int, help="concurrent Locust users (closed model)")
    load.add_argument(
        "--rate", type=float, help="visits started per second whatever the server does (open model)"
    )
    parser.add_argument(
        "--arrivals",
        choices=("poisson", "constant"),
        default="poisson",
        help="open model: Poisson or evenly spaced starts (default: poisson)",
    )
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=1000,
        help="open model: visits running at once at most (default: 1000)",
    )
    parser.add_argument("--duration", type=float, help="seconds of load per mode")
    parser.add_argument(
        "--latency",
        default=DEFAULT_LATENCY,
        help="fake Mailgun latency model, e.g. fixed:0.75, uniform:0.5,1.0, "
        "lognormal:median=0.7,sigma=0.4,max=5",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results"), help="results root folder")
    parser.add_argument(
        "--locust-processes",
        type=int,
        default=0,
        help="run Locust with --processes N (merges histograms)",
    )
    parser.add_argument("--concurrency", type=int, help="worker concurrency (queued modes)")
    parser.add_argument(
        "--inject-send-delay-ms",
        type=float,
        default=0.0,
        help="add a known delay to POST /send (to test the CI gate)",
    )


def config_from_args(args: argparse.Namespace) -> RunConfig:
    profile = PROFILES[args.profile]
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ConfigError(
            f"unknown mode(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(MODES)}"
        )
    users = args.users if args.users is not None else profile.users
    return RunConfig(
        modes=modes,
        profile=profile.name,
        scenario=args.scenario,
        users=users,
        rate=args.rate,
        arrivals=args.arrivals,
        max_in_flight=args.max_in_flight,
        sweep=profile.name == "full",
        spawn_rate=min(profile.spawn_rate, users),
        duration_s=args.duration if args.duration is not None else profile.duration_s,
        latency=args.latency,
        seed=args.seed,
        out=args.out,
        locust_processes=args.locust_processes,
        worker_concurrency=args.concurrency or profile.worker_concurrency,
        drain_timeout_s=profile.drain_timeout_s,
        send_delay_ms=args.inject_send_delay_ms,
    )


class QueueUrls:
    """The queue URL of each queued mode: SQLite needs nothing; the others need a broker,
    started on first use (or taken from AMQP_URL / REDIS_URL / DATABASE_URL)."""

    def __init__(self, services: Services, run_dir: Path, strict: bool) -> None:
        self.services = services
        self.run_dir = run_dir
        self.strict = strict  # under CI a missing broker fails the run instead of skipping

    def __call__(self, mode: str) -> str | None:
        if mode == "sqlite":
            path = (self.run_dir / "queue" / "jobs.db").resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
            return f"sqlite:///{path}"
        try:
            return self.services.start(mode)  # the broker services are named after the modes
        except ServiceUnavailable as exc:
            if self.strict:
                raise
            print(f"skipping mode {mode}: {exc}", file=sys.stderr, flush=True)
            return None


def cli_main(args: argparse.Namespace) -> int:
    from harness.report import build_report

    config = config_from_args(args)
    print(
        f"mailbench run {config.run_id}: modes {', '.join(config.modes)}; "
        f"{config.load_model}, {config.duration_s:.0f} s each; API latency {config.latency}",
        flush=True,
    )
    strict = os.environ.get("CI", "").lower() == "true"
    with Children() as children, Services(ServiceSettings()) as services:
        queue_urls = QueueUrls(services, config.run_dir, strict)
        harness = Harness(config, children, queue_url_for=queue_urls)
        results = harness.run()
    if not results:
        raise MailbenchError("no mode could run; see the messages above")
    build_report(config.run_dir)
    point_latest(config.run_dir)
    print(f"results in {config.run_dir}/ (report.md, charts/gap.png)", flush=True)
    for result in results:
        if result.accounting.lost or result.accounting.unexpected:
            print(
                f"WARNING: {result.mode}: lost={result.accounting.lost} "
                f"unexpected={result.accounting.unexpected}",
                file=sys.stderr,
            )
    return 0
