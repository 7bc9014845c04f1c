"""One Locust run against one mode's server, headless, in a process of its own (importing
Locust monkey-patches the interpreter with gevent).

While it runs, the harness prints progress once a second, samples the queue depth over
a connection of its own (:mod:`harness.run.depth`), and calls the run's hook every 0.2 s
(chaos breaks things from there).
"""

from __future__ import annotations

import contextlib
import csv
import ipaddress
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from harness.errors import ProcessFailed, ResultsError
from harness.process import Children
from harness.results.collect import read_locust
from harness.run.config import CLOSED_USERS, SCENARIOS_DIR, RunConfig
from harness.run.depth import DepthSampler
from harness.run.tiers import Tiers, pin
from harness.services.settings import ServiceSettings

Tick = Callable[[Tiers, float], None]  # (tiers, seconds into the load)
EXPECT_WORKERS_WAIT_S = 120.0  # how long a master waits for workers of other hosts


def locust_argv(
    config: RunConfig,
    base_url: str,
    raw: Path,
    rate: float | None,
    duration: float,
    warmup: float = 0.0,
) -> list[str]:
    cfg = config
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
        "--warmup",
        f"{warmup:g}",
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
    if remote_workers(cfg, base_url):
        # Workers on other hosts: the load starts once they have all joined.
        argv += ["--master", "--expect-workers", str(cfg.expect_workers)]
        argv += ["--master-bind-host", cfg.master_host, "--master-bind-port", str(cfg.master_port)]
        argv += ["--expect-workers-max-wait", f"{EXPECT_WORKERS_WAIT_S:g}"]
    return argv


def remote_workers(config: RunConfig, base_url: str) -> bool:
    """Whether Locust workers of other hosts drive ``base_url``: with ``--expect-workers``,
    unless it is on loopback, which only this host reaches (a sample the harness takes of
    a server of its own is loaded from here)."""
    return bool(config.expect_workers) and not on_loopback(base_url)


def on_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: another host may resolve it


class LocustRun:
    def __init__(
        self,
        config: RunConfig,
        children: Children,
        on_tick: Tick,
        services: ServiceSettings | None = None,
    ) -> None:
        self.config = config
        self.children = children
        self.on_tick = on_tick
        self.services = services  # where the brokers mailbench started live (the depth)
        self.show_progress = sys.stdout.isatty()

    def run(
        self,
        tiers: Tiers,
        raw: Path,
        rate: float | None = None,
        duration: float | None = None,
        sample_depth: bool = True,
        warmup: float | None = None,
    ) -> None:
        """Drive ``tiers`` for ``duration`` seconds (the configured load unless given);
        Locust's histograms and send lists land in ``raw``. The warm-up is the
        configured one for the configured load, none for a step given its own duration
        (a sweep step follows the warmed-up main load)."""
        cfg = self.config
        name = tiers.name
        rate = cfg.rate if rate is None else rate
        if warmup is None:
            warmup = cfg.warmup_s if duration is None else 0.0
        duration = cfg.duration_s if duration is None else duration
        raw.mkdir(parents=True, exist_ok=True)
        locust = self.children.start(
            f"locust ({name})",
            locust_argv(cfg, tiers.base_url, raw, rate, duration, warmup),
            cfg.run_dir / "logs" / f"{name}-locust.log",
        )
        pin(cfg, locust, "locust")  # before it forks any --processes workers
        deadline = time.monotonic() + duration + 60
        if remote_workers(cfg, tiers.base_url):
            deadline += EXPECT_WORKERS_WAIT_S
            print(
                f"[{name:>8}] waiting for {cfg.expect_workers} Locust workers at "
                f"{cfg.master_host}:{cfg.master_port}",
                flush=True,
            )
        started = time.monotonic()
        next_second = started
        # Keyed by when each sample was taken: the timeline puts it in its second since
        # the first request.
        sampler = None
        if sample_depth and tiers.queue_url:
            sampler = DepthSampler(tiers.queue_url, tiers.queue_name, self.services, tiers.mode)
        with sampler or contextlib.nullcontext():
            while locust.alive():
                if time.monotonic() > deadline:
                    self.children.stop(locust)
                    raise ProcessFailed(
                        f"Locust did not finish the {name} run in time; see {locust.log_path}"
                    )
                time.sleep(0.2)
                elapsed = time.monotonic() - started
                self.on_tick(tiers, elapsed)
                if time.monotonic() < next_second:
                    continue
                next_second += 1.0
                self._progress(name, duration - elapsed, raw)
        if self.show_progress:
            print(flush=True)
        if sampler is not None and sampler.samples:
            (raw / "depth.json").write_text(json.dumps(sampler.samples))
        code = self.children.stop(locust)
        try:
            read_locust(raw)
        except ResultsError as exc:
            raise ProcessFailed(
                f"Locust failed in mode {name} (exit code {code}): {exc}; "
                f"its log ends with:\n{locust.tail()}"
            ) from exc
        if code not in (0, None):
            raise ProcessFailed(
                f"Locust failed in mode {name} (exit code {code}); "
                f"its log ends with:\n{locust.tail()}"
            )

    def _progress(self, name: str, left: float, raw: Path) -> None:
        rate, failures = _locust_rate(raw / "locust_stats.csv")
        line = f"[{name:>8}] {max(0, left):4.0f} s left · {rate:7.0f} req/s · {failures} failures"
        if self.show_progress:
            print(f"\r{line}", end="", flush=True)
        elif int(left) % 5 == 0:
            print(line, flush=True)


def _locust_rate(stats_csv: Path) -> tuple[float, int]:
    try:
        with stats_csv.open(newline="") as f:
            for row in csv.DictReader(f):
                if row.get("Name") == "Aggregated":
                    return float(row.get("Requests/s") or 0), int(row.get("Failure Count") or 0)
    except (OSError, ValueError):
        pass
    return 0.0, 0
