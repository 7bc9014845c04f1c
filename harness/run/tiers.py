"""The processes that serve one mode: server processes behind one port, and workers.

:class:`TierStarter` knows the command lines: ``mailbench serve`` for the servers (with
``--reuse-port`` when there are several) and the mode's worker command for the workers
(see :mod:`servers.modes`), each with its files under the mode's ``raw/`` folder and a
number per process started, so a replacement never overwrites a file. For a target
(``--target`` with ``--server-cmd``/``--worker-cmd``) it starts the target's own
commands instead, told what :meth:`~harness.run.target.Target.environment` lists. It also replaces
a worker that exited by itself, as a supervisor would (a poison job kills each worker
it reaches until the worker dead-letters it: see ``--max-deliveries``). The queue URL,
which carries the broker's password, goes to them in the environment
(:data:`servers.queue_url.QUEUE_URL_VAR`), never on a command line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from harness.errors import ConfigError
from harness.process import (
    Child,
    Children,
    answered_identity,
    free_port,
    mailbench_command,
    port_taken,
    wait_ready,
)
from harness.run.config import RunConfig
from harness.run.phases import CONTROL_FILE
from harness.run.target import MAILGUN_KEY_VAR, Target
from servers.fakegun.server import FakegunSettings
from servers.modes import Mode
from servers.queue_url import QUEUE_URL_VAR

# How long a dead worker's jobs wait for another worker where the URL does not say: the
# default lease of the SQL queues and visibility timeout of Redis (queues.sql, .redis).
DEFAULT_REDELIVERY_S = 30.0
# Workers replaced per mode at most: past that, something other than a job kills them
# (a broken setup), and starting more would only hide it.
MAX_REPLACEMENTS = 50
# Seconds a server started under load (a restart), or a target's server, has to answer.
RESTART_READY_S = 90.0


@dataclass
class Tiers:
    """The processes serving one mode, and where they write."""

    mode: Mode | None  # None: a server mailbench did not start (``--target``)
    name: str
    raw: Path
    base_url: str
    port: int
    queue_url: str | None = field(repr=False)  # with the broker's password
    queue_name: str
    servers: list[Child] = field(default_factory=list)
    workers: list[Child] = field(default_factory=list)
    started: dict[str, int] = field(default_factory=lambda: {"server": 0, "worker": 0})
    replaced: int = 0  # workers that exited by themselves and were replaced

    @property
    def follow_phases(self) -> bool:
        """Whether servers of mailbench's own run here, which follow the phase file and
        report the first request (a target's processes do neither)."""
        return self.mode is not None and bool(self.servers)

    def next_index(self, kind: str) -> int:
        index = self.started[kind]
        self.started[kind] += 1
        return index


class TierStarter:
    def __init__(self, config: RunConfig, children: Children, fake_url: str, secret: str) -> None:
        self.config = config
        self.children = children
        self.fake_url = fake_url
        # Several server processes check each other's CSRF tokens: one secret for all.
        self.secret = secret

    def start(self, mode: Mode, queue_url: str | None, raw: Path) -> Tiers:
        """Servers (ready to answer) and, with a queue, workers."""
        cfg = self.config
        port = free_port()
        # A queue of its own per run and mode: jobs left on a shared broker by an earlier,
        # interrupted run can never be counted in this one.
        queue_name = f"mailbench-{cfg.run_id}-{mode.name}"
        base_url = f"http://127.0.0.1:{port}"
        tiers = Tiers(mode, mode.name, raw, base_url, port, queue_url, queue_name)
        self.start_servers(tiers)
        if queue_url:
            for _ in range(cfg.worker_procs):
                self.start_worker(tiers)
        return tiers

    def external(self, target: Target, raw: Path) -> Tiers:
        """A server someone else runs (nothing to start or stop), or one whose server and
        worker processes the harness starts from the target's commands."""
        tiers = Tiers(None, target.name, raw, target.url.rstrip("/"), target.port, None, "")
        if target.server_cmd:
            if port_taken(target.port):
                raise ConfigError(
                    f"Port {target.port} of --target {target.url} is taken before --server-cmd "
                    "started anything: stop what listens there, or give --target another port."
                )
            self.start_servers(tiers)
        if target.worker_cmd:
            for _ in range(self.config.worker_procs):
                self.start_worker(tiers)
        return tiers

    def _start_target_process(self, tiers: Tiers, tier: str) -> Child:
        """One of the target's processes, from ``--server-cmd`` or ``--worker-cmd``."""
        target = self.config.target
        assert target is not None
        index = tiers.next_index(tier)
        api_key = os.environ.get(MAILGUN_KEY_VAR, FakegunSettings.api_key)
        env = target.environment(self.fake_url, api_key, self.secret, index)
        child = self.children.start(
            f"{tier} {index} ({target.name})",
            target.command(tier, env),
            self.config.run_dir / "logs" / f"{target.name}-{tier}-{index}.log",
            env=env,
        )
        pin(self.config, child, tier)
        (tiers.servers if tier == "server" else tiers.workers).append(child)
        return child

    def start_servers(self, tiers: Tiers) -> None:
        """Start the servers and wait until each answers with its own identity, so that
        whatever else holds the port is an error, not the server measured."""
        for _ in range(self.config.server_procs):
            self.start_server(tiers)
        self._wait_servers(tiers)

    def restart_server(self, tiers: Tiers, victim: Child) -> Child:
        """SIGKILL one server, as a deploy or a crash would, start another in its place
        and wait until it answers; the others keep serving the port meanwhile."""
        tiers.servers.remove(victim)
        self.children.kill(victim)
        replacement = self.start_server(tiers)
        # Started while the load runs, on a machine it keeps busy: give it longer.
        self._wait_servers(tiers, timeout=RESTART_READY_S)
        return replacement

    def _wait_servers(self, tiers: Tiers, timeout: float = 30.0) -> None:
        if tiers.mode is None:
            # A target's server answers no identity: each must hold the port itself.
            assert self.config.target is not None
            for server in tiers.servers:
                server.wait_listening(tiers.port, timeout=max(timeout, RESTART_READY_S))
            self.config.target.check_form_page()
            return
        wait_ready(
            tiers.servers,
            lambda: answered_identity(f"{tiers.base_url}/_mailbench/metrics"),
            tiers.port,
            what_to_do="stop it and run again (mailbench picks its servers' ports itself)",
            timeout=timeout,
        )

    def start_server(self, tiers: Tiers) -> Child:
        cfg, mode = self.config, tiers.mode
        if mode is None:
            return self._start_target_process(tiers, "server")
        index = tiers.next_index("server")
        args = ["serve", "--mode", mode.name, "--port", str(tiers.port)]
        args += ["--mailgun-url", self.fake_url]
        args += ["--metrics-out", str(tiers.raw / f"server-{index}.json")]
        args += ["--phase-file", str(tiers.raw / CONTROL_FILE)]
        if cfg.server_procs > 1:
            args.append("--reuse-port")
        env = {"MAILBENCH_SECRET": self.secret}
        if tiers.queue_url:
            args += ["--queue-name", tiers.queue_name]
            env[QUEUE_URL_VAR] = tiers.queue_url
        if cfg.send_delay_ms:
            args += ["--inject-send-delay-ms", str(cfg.send_delay_ms)]
        if cfg.send_work_us:
            args += ["--inject-send-work-us", f"{cfg.send_work_us:g}"]
        if cfg.form_work_us:
            args += ["--inject-form-work-us", f"{cfg.form_work_us:g}"]
        if cfg.render_ms and not mode.queued:  # queued modes render in the worker
            args += ["--render-ms", f"{cfg.render_ms:g}"]
        server = self.children.start(
            f"server {index} ({mode.name})",
            mailbench_command(*args, python=mode.python),
            self.config.run_dir / "logs" / f"{mode.name}-server-{index}.log",
            env=env,
        )
        pin(cfg, server, "server")
        tiers.servers.append(server)
        return server

    def start_worker(self, tiers: Tiers) -> Child:
        cfg, mode = self.config, tiers.mode
        if mode is None:
            return self._start_target_process(tiers, "worker")
        assert mode.worker is not None and tiers.queue_url is not None
        index = tiers.next_index("worker")
        args = [mode.worker, "--queue-name", tiers.queue_name]
        args += ["--concurrency", str(cfg.worker_concurrency), "--mailgun-url", self.fake_url]
        args += ["--metrics-out", str(tiers.raw / f"worker-{index}.json")]
        args += ["--phase-file", str(tiers.raw / CONTROL_FILE)]
        args += ["--dead-letters-out", str(tiers.raw / f"dead-letters-{index}.jsonl")]
        if cfg.render_ms:
            args += ["--render-ms", f"{cfg.render_ms:g}"]
        args += mode.worker_args
        worker = self.children.start(
            f"worker {index} ({mode.name})",
            mailbench_command(*args, python=mode.python),
            self.config.run_dir / "logs" / f"{mode.name}-worker-{index}.log",
            env={QUEUE_URL_VAR: tiers.queue_url},
        )
        pin(cfg, worker, "worker")
        tiers.workers.append(worker)
        return worker

    def replace_exited_workers(self, tiers: Tiers) -> list[str]:
        """Start a worker for each one that exited by itself; a line on each."""
        notes = []
        for worker in [w for w in tiers.workers if not w.alive()]:
            tiers.workers.remove(worker)
            code = self.children.stop(worker)
            if tiers.replaced >= MAX_REPLACEMENTS:
                notes.append(
                    f"{worker.name} exited by itself (code {code}); not replaced: "
                    f"{MAX_REPLACEMENTS} workers were already"
                )
                continue
            tiers.replaced += 1
            replacement = self.start_worker(tiers)
            notes.append(
                f"{worker.name} exited by itself (code {code}); started {replacement.name}"
            )
        return notes

    def stop(self, tiers: Tiers) -> list[str]:
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


def redelivery_s(mode: Mode | None, queue_url: str | None) -> float:
    """Seconds until the jobs a dead worker held reach another worker: its lease or
    visibility timeout (as the queue URL sets it), 0 where the broker notices at once."""
    if mode is None or queue_url is None or mode.lease_parameter is None:
        return 0.0
    given = parse_qs(urlsplit(queue_url).query).get(mode.lease_parameter)
    return float(given[-1]) if given else DEFAULT_REDELIVERY_S


def pin(config: RunConfig, child: Child, tier: str) -> None:
    """Keep a tier on its CPUs (``--cpus``) and at its priority (``--nice``), as if it had
    a machine of its own, or only the CPU time the others leave."""
    cpus = config.cpus_of(tier)
    if cpus is not None:
        os.sched_setaffinity(child.pid, cpus)
    nice = config.nice_of(tier)
    if nice is not None:
        # Threads it starts later inherit the value (Linux keeps it per thread).
        os.setpriority(os.PRIO_PROCESS, child.pid, nice)
