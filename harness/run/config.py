"""What a run is asked to do: profiles and :class:`RunConfig`, read once at the entry point."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.run.target import Target
from servers.modes import DEFAULT

SCENARIOS_DIR = Path(__file__).resolve().parents[2] / "scenarios"
SCENARIOS = ("mixed", "reader", "sender")
# The closed-model user classes of each scenario; every scenario also has ``Arrivals``.
CLOSED_USERS = {"mixed": ("Reader", "Sender"), "reader": ("Reader",), "sender": ("Sender",)}
DEFAULT_LATENCY = "uniform:0.5,1.0"
DEFAULT_MODES = DEFAULT  # the framework modes run with --modes frameworks
# Seconds from a mode's first request whose requests are left out of its figures: the
# cold start (connections opened, caches and the broker warming) is not the steady state.
DEFAULT_WARMUP_S = 3.0


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
    warmup_s: float = DEFAULT_WARMUP_S  # part of duration_s, left out of summaries
    latency: str = DEFAULT_LATENCY
    seed: int = 1
    out: Path = Path("results")
    locust_processes: int = 0  # 0: one Locust process; N: Locust's --processes N
    # N: Locust workers on other hosts join the master, which listens on master_host:port.
    expect_workers: int = 0
    master_host: str = "127.0.0.1"
    master_port: int = 5557  # Locust's own default
    server_procs: int = 1  # server processes sharing one port (SO_REUSEPORT)
    worker_procs: int = 1  # worker processes per queued mode
    worker_concurrency: int = 200
    render_ms: float = 0.0  # CPU work per email: in the handler (direct), else the worker
    drain_timeout_s: float = 60
    send_delay_ms: float = 0.0
    send_work_us: float = 0.0  # CPU time added to every POST /send (a known slowdown)
    form_work_us: float = 0.0  # and to every form page
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

    def nice_of(self, tier: str) -> int | None:
        return dict(self.nice).get(tier)
