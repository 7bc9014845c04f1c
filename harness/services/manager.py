"""Real RabbitMQ, Redis and PostgreSQL for benchmarks and tests, with no container engine.

Each broker runs from the machine's own binaries as a child process on loopback and a
private port, with its data, config and logs under ``base_dir/<name>/``::

    with Services(ServiceSettings()) as services:
        url = services.start("redis")     # redis://mailbench:<password>@127.0.0.1:28379/0
        ...                               # everything is stopped on exit and Ctrl-C

Each broker mailbench starts lets in only the user and password drawn for its data
(kept in ``base_dir/<name>/credentials.json``, 0600, and in the URL returned): other users
of the machine can neither read the queued emails nor add jobs for the workers to send.

A broker the user already runs is used instead when its variable is set (``AMQP_URL``,
``REDIS_URL``, ``DATABASE_URL``), and so is one left running by ``mailbench services up``
(it records what it started in ``base_dir/state.json``); neither is ever stopped here.
On Debian/Ubuntu as root a missing broker is installed with apt-get; otherwise, or when a
broker will not start, :class:`~harness.errors.ServiceUnavailable` says in one sentence
what to do. Recipes per broker live in :mod:`harness.services.brokers`, process plumbing
in :mod:`harness.process`. SIGTERM stops them too where the entry point makes it unwind
like Ctrl-C (``harness.cli`` does, with :func:`harness.process.sigterm_interrupts`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from harness.errors import ConfigError, ServiceUnavailable
from harness.process import (
    TAG_VAR,
    Pid,
    family,
    port_taken,
    signals_deferred,
    spawn,
    terminate,
    with_environment,
)
from harness.services.brokers import (
    BROKERS,
    Broker,
    Credentials,
    Launch,
    as_user,
    ensure_installed,
    open_log,
    private_dir,
)
from harness.services.settings import (
    ENV_VARS,
    REDIS_FSYNC,
    SERVICE_NAMES,
    ServiceSettings,
    services_home,
)
from harness.services.state import (
    ENV_FILE,
    entry_alive,
    read_state,
    stop_entry,
    urls_from_state,
    write_state,
)
from queues.urls import redact_url

__all__ = [
    "ServiceStatus",
    "Services",
    "add_cli_arguments",
    "add_service_arguments",
    "cli_main",
    "settings_from_args",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    state: str  # "running", "exited" (died on its own), "external" (not ours) or "stopped"
    url: str | None = field(default=None, repr=False)  # with the password
    pids: tuple[int, ...] = ()  # every process of the broker we know of, leader first
    log: Path | None = None


@dataclass
class _Child:
    broker: Broker
    url: str = field(repr=False)
    leader: Pid
    tag: str
    popen: subprocess.Popen[bytes]
    log_path: Path


class Services:
    """Brokers started on demand and stopped together; a context manager."""

    def __init__(
        self, settings: ServiceSettings | None = None, *, fresh: bool = True, detached: bool = False
    ) -> None:
        """``fresh``: wipe a broker's data before starting it, so runs are independent.
        ``detached``: brokers may outlive this process (``services up``; see detach())."""
        self.settings = settings or ServiceSettings()
        self.fresh = fresh
        self.detached = detached
        self._children: dict[str, _Child] = {}
        self._external: dict[str, str] = {}
        self._failed = False  # a broker did not start: its log is worth keeping

    def __enter__(self) -> Services:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with signals_deferred():  # a second Ctrl-C must not leave brokers behind
            self.stop_all()
            if self.settings.temporary:
                self._remove_temporary_dir()

    def _remove_temporary_dir(self) -> None:
        base = self.settings.base_dir
        if self._failed:
            print(f"mailbench: kept {base} for the logs of the broker that failed", file=sys.stderr)
            return
        shutil.rmtree(base, ignore_errors=True)

    def start(self, name: str) -> str:
        """Have ``name`` running and return its URL; a no-op if it already runs."""
        broker = _broker(name)
        settings = self.settings
        if name in self._external:
            return self._external[name]
        if (child := self._children.get(name)) is not None:
            if child.leader.alive():
                return child.url
            log.warning("%s had exited: starting it again (log: %s)", broker.title, child.log_path)
            self.stop(name)
        if (url := settings.url_from_env(name)) is not None:
            log.info("%s: using %s=%s", broker.title, ENV_VARS[name], redact_url(url))
            self._external[name] = url
            return url
        shared = settings.shared_dir or settings.base_dir
        if (url := urls_from_state(shared).get(name)) is not None:
            log.info(
                "%s: using the one `mailbench services up` started, %s",
                broker.title,
                redact_url(url),
            )
            self._external[name] = url
            return url
        ensure_installed(broker, settings)
        for port in broker.ports(settings):
            if port_taken(port):
                raise ServiceUnavailable(
                    f"{broker.title} cannot start: port {port} on 127.0.0.1 is in use (if by "
                    f"`mailbench services up`, run `mailbench services down`), so pick other "
                    f"ports or set {broker.env_var} to use a server that is already running."
                )
        workdir = settings.base_dir / name
        if self.fresh:
            shutil.rmtree(workdir, ignore_errors=True)
        # Ours alone, but for root's brokers: PostgreSQL's user passes through to its data.
        private_dir(settings.base_dir, 0o711 if os.geteuid() == 0 else 0o700)
        private_dir(workdir)
        credentials = Credentials.kept_in(workdir / "credentials.json", broker.login)
        began = time.monotonic()
        launch = broker.prepare(settings, workdir, credentials)
        # Readiness probes get the tag too: were one to spawn a process, it would be found.
        tag = f"{broker.name}-{uuid.uuid4().hex}"
        launch = dataclasses.replace(launch, env={**launch.env, TAG_VAR: tag})
        child = self._spawn(broker, launch, workdir, tag, credentials)
        try:
            self._wait_ready(child, launch, credentials)
            broker.after_ready(settings, workdir, credentials)
        except BaseException as exc:
            # Also on Ctrl-C while waiting: a half-started broker must not outlive us.
            self._failed = self._failed or isinstance(exc, ServiceUnavailable)
            self.stop(name)
            raise
        log.info(
            "%s ready at %s in %.2f s (pid %d, log %s)",
            broker.title,
            redact_url(child.url),
            time.monotonic() - began,
            child.leader.pid,
            child.log_path,
        )
        return child.url

    def stop(self, name: str) -> None:
        """Stop ``name`` if we started it; a broker we did not start is only forgotten."""
        _broker(name)
        self._external.pop(name, None)
        child = self._children.get(name)
        if child is None:
            return
        if survivors := self._terminate(child, child.broker.stop_signal):
            log.error("%s: processes %s survived SIGKILL", child.broker.title, survivors)
        else:
            log.info("%s stopped", child.broker.title)

    def restart(self, name: str, *, crash: bool = True) -> str:
        """Stop ``name`` — with its crash signal unless ``crash`` is false — and start it
        again on its data, as after a crash or a reboot; return its URL."""
        broker = _broker(name)
        child = self._children.get(name)
        if child is None:
            where = self._external.get(name)
            raise ServiceUnavailable(
                f"{broker.title} cannot be restarted: mailbench did not start it"
                + (f" (it is the one at {redact_url(where)})" if where else "")
                + "; leave its URL unset to have mailbench start one."
            )
        stop_signal = child.broker.crash_signal if crash else child.broker.stop_signal
        if survivors := self._terminate(child, stop_signal):
            raise ServiceUnavailable(
                f"{broker.title} could not be stopped for a restart: pids {survivors} survived"
            )
        fresh, self.fresh = self.fresh, False  # keep its data
        try:
            return self.start(name)
        finally:
            self.fresh = fresh

    def _terminate(self, child: _Child, sig: int) -> list[Pid]:
        """Stop a broker and forget it; no signal cuts in between (it would be lost)."""
        with signals_deferred():
            self._children.pop(child.broker.name, None)
            return terminate(
                child.leader,
                sig=sig,
                helpers=with_environment({TAG_VAR: child.tag}),
                popen=child.popen,
                timeout=self.settings.stop_timeout,
            )

    def stop_all(self) -> None:
        """Stop every broker we started, newest first; one failure does not stop the rest."""
        for name in reversed(list(self._children) + list(self._external)):
            try:
                self.stop(name)
            except Exception:
                log.exception("could not stop %s", name)

    def status(self) -> dict[str, ServiceStatus]:
        """The state of every service, keyed by name, in SERVICE_NAMES order."""
        result = {}
        for name in SERVICE_NAMES:
            child = self._children.get(name)
            if child is not None:
                alive = child.leader.alive()
                pids = [*family(child.leader), *with_environment({TAG_VAR: child.tag})]
                result[name] = ServiceStatus(
                    name,
                    "running" if alive else "exited",
                    child.url,
                    tuple(dict.fromkeys(p.pid for p in pids if p.alive())),
                    child.log_path,
                )
            elif name in self._external:
                result[name] = ServiceStatus(name, "external", self._external[name])
            else:
                result[name] = ServiceStatus(name, "stopped")
        return result

    def detach(self) -> dict[str, dict[str, Any]]:
        """Hand the running brokers over to the caller: they outlive this object.

        Returns the state-file entries that `services down` needs to stop them later.
        """
        entries = {}
        for name, child in self._children.items():
            entries[name] = {
                "url": child.url,
                "pid": child.leader.pid,
                "pgid": child.leader.pid,  # started in a session of its own
                "leader": child.leader.as_json(),
                "tag": child.tag,
                "signal": int(child.broker.stop_signal),
                "log": str(child.log_path),
            }
            # Popen warns when collected while its child runs; the broker is meant to
            # outlive us, and `services down` reaps it if we are still its parent.
            child.popen.returncode = 0
        self._children.clear()
        return entries

    def _spawn(
        self, broker: Broker, launch: Launch, workdir: Path, tag: str, credentials: Credentials
    ) -> _Child:
        log.debug("starting %s: %s", broker.title, " ".join(launch.argv))
        # Not cut half-way by a signal: registered at once, so that stop_all finds it.
        with signals_deferred(), open_log(launch.log_path) as out:
            popen = spawn(
                launch.argv,
                out,
                env=launch.env,
                cwd=workdir,
                attached=not self.detached,
                **as_user(launch.user),
            )
            leader = Pid.of(popen.pid) or Pid(popen.pid, 0)
            url = broker.url(self.settings, credentials)
            child = _Child(broker, url, leader, tag, popen, launch.log_path)
            self._children[broker.name] = child
        return child

    def _wait_ready(self, child: _Child, launch: Launch, credentials: Credentials) -> None:
        broker, popen = child.broker, child.popen
        logs = " and ".join(str(p) for p in (launch.log_path, *launch.logs))
        deadline = time.monotonic() + self.settings.start_timeout
        while not broker.ready(self.settings, launch, credentials):
            if popen.poll() is not None:
                raise ServiceUnavailable(
                    f"{broker.title} exited with code {popen.returncode} while starting: "
                    f"see {logs}."
                )
            if time.monotonic() > deadline:
                raise ServiceUnavailable(
                    f"{broker.title} did not become ready within "
                    f"{self.settings.start_timeout:.0f} s: see {logs}."
                )
            time.sleep(0.1)


def _broker(name: str) -> Broker:
    try:
        return BROKERS[name]
    except KeyError:
        raise ConfigError(
            f"Unknown service {name!r}: choose from {', '.join(SERVICE_NAMES)}."
        ) from None


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"any of {', '.join(SERVICE_NAMES)} (all)"
    )
    add_service_arguments(parser)


def add_service_arguments(
    parser: argparse.ArgumentParser, dir_flag: str = "--dir", per_run: bool = False
) -> None:
    """Where brokers started by mailbench live and listen (read by settings_from_args).
    ``per_run``: a command whose brokers last one run (``run``, ``chaos``): by default
    they live in a temporary directory, removed after it."""
    default = "a temporary directory, removed after the run" if per_run else ".mailbench/services"
    parser.add_argument(
        dir_flag, dest="base_dir", type=Path, help=f"broker data, logs and state "
        f"(default: {default})",
    )  # fmt: skip
    parser.set_defaults(services_per_run=per_run)
    parser.add_argument(
        "--port", action="append", default=[], metavar="NAME=PORT",
        help=f"override a broker port: {', '.join(_PORTS)}",
    )  # fmt: skip
    parser.add_argument("--no-install", action="store_true", help="never run apt-get")
    parser.add_argument(
        "--redis-fsync", choices=REDIS_FSYNC, default=ServiceSettings.redis_fsync,
        help="when the Redis mailbench starts fsyncs its append-only file: always (before "
        "each reply: an accepted job survives a host crash) or everysec (once a second: a "
        "host crash can lose the last ~2 s of accepted jobs) (default: "
        f"{ServiceSettings.redis_fsync})",
    )  # fmt: skip


# NAME of every NAME_port setting: what --port NAME=PORT may set.
_PORTS = tuple(
    f.name.removesuffix("_port")
    for f in dataclasses.fields(ServiceSettings)
    if f.name.endswith("_port")
)


def settings_from_args(args: argparse.Namespace) -> ServiceSettings:
    changes: dict[str, Any] = {}
    if args.base_dir is not None:
        changes["base_dir"] = args.base_dir.resolve()
    elif getattr(args, "services_per_run", False):
        # Not the current folder: a run started anywhere leaves nothing there. Brokers
        # that `mailbench services up` left running are still found in its usual place.
        changes["base_dir"] = Path(tempfile.mkdtemp(prefix="mailbench-services-"))
        changes["temporary"] = True
        changes["shared_dir"] = services_home()
    if args.no_install:
        changes["install"] = False
    changes["redis_fsync"] = args.redis_fsync
    for spec in args.port:
        key, _, value = spec.partition("=")
        name = key.replace("-", "_")
        if name not in _PORTS or not value.isdigit():
            raise ConfigError(
                f"--port expects NAME=PORT with NAME one of {', '.join(_PORTS)}, "
                f"e.g. redis=28379, not {spec!r}."
            )
        changes[f"{name}_port"] = int(value)
    return ServiceSettings(**changes)


def cli_main(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    names = tuple(args.names) or SERVICE_NAMES
    for name in names:
        _broker(name)
    if args.action == "up":
        return _up(settings, names)
    if args.action == "down":
        return _down(settings, names)
    return _status(settings, names)


def _up(settings: ServiceSettings, names: tuple[str, ...]) -> int:
    failed = 0
    urls = {}
    with Services(settings, detached=True) as services:
        for name in names:
            try:
                urls[name] = services.start(name)
            except ServiceUnavailable as exc:
                print(f"mailbench services: {exc}", file=sys.stderr)
                failed += 1
        started = services.detach()
    state = {n: e for n, e in read_state(settings.base_dir).items() if entry_alive(e)}
    write_state(settings.base_dir, state | started)
    for name, url in urls.items():
        print(f"{name:<9} running   {redact_url(url)}")
    if urls:
        # The passwords stay out of the terminal, where CI logs, scrollback and shared
        # screens keep them: `mailbench run` finds these brokers by itself, and a user's
        # own clients source the file, which only they can read.
        print(f"URLs with their passwords (yours alone to read): . {_env_file(settings)}")
    return 1 if failed else 0


def _env_file(settings: ServiceSettings) -> Path:
    return settings.base_dir / ENV_FILE


def _down(settings: ServiceSettings, names: tuple[str, ...]) -> int:
    state = read_state(settings.base_dir)
    failed = 0
    for name in names:
        entry = state.pop(name, None)
        if entry is None:
            continue
        if survivors := stop_entry(entry, settings.stop_timeout):
            print(f"mailbench services: {name}: {survivors} survived SIGKILL", file=sys.stderr)
            failed += 1
        else:
            print(f"stopped {name} (pid {entry.get('pid')})")
    write_state(settings.base_dir, state)
    return 1 if failed else 0


def _status(settings: ServiceSettings, names: tuple[str, ...]) -> int:
    state = read_state(settings.base_dir)
    for name in names:
        entry = state.get(name)
        if (url := settings.url_from_env(name)) is not None:
            print(f"{name:<9} external  {redact_url(url)} (from {ENV_VARS[name]})")
        elif entry is not None and entry_alive(entry):
            where = f"(pid {entry['pid']}, log {entry['log']})"
            print(f"{name:<9} running   {redact_url(entry['url'])} {where}")
        else:
            print(f"{name:<9} stopped")
    if any(entry_alive(e) for e in state.values()):
        print(f"URLs with their passwords (yours alone to read): . {_env_file(settings)}")
    return 0
