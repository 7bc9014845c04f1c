"""How to run each broker from the machine's own binaries, for :mod:`harness.services.manager`.

One class per broker, each knowing where its binaries live, how to lay out its private
directory, which command line starts it in the foreground on loopback and private ports,
and how to tell that it answers. Starting, stopping and bookkeeping are not here.

Every broker is closed to the machine's other users: it gets a user and password drawn
for its data (:class:`Credentials`), which reach it through a file only its owner reads
(Redis's config, RabbitMQ's config, initdb's password file), never a command line, which
``ps`` shows to everyone; its directories are 0700 (PostgreSQL's, entered by the
``postgres`` user when we are root, 0711: it can pass, not list).
"""

from __future__ import annotations

import glob
import grp
import importlib.util
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import BinaryIO, Protocol, TypedDict

from harness.errors import ServiceUnavailable
from harness.process import port_open
from harness.services.settings import ENV_VARS, ServiceSettings
from harness.services.state import write_private

log = logging.getLogger(__name__)

_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Credentials:
    """The user a broker's clients log in as, and its password."""

    user: str
    password: str = field(repr=False)

    @classmethod
    def kept_in(cls, path: Path, user: str) -> Credentials:
        """The credentials in ``path`` (0600), drawn and written there on first use: a
        broker restarted on its data keeps them, a fresh one gets new ones."""
        try:
            data = json.loads(path.read_text())
            if data.get("user") == user and data.get("password"):
                return cls(user, str(data["password"]))
        except (OSError, ValueError, AttributeError):
            pass
        # URL-safe characters only: the password goes into URLs and config files as is.
        made = cls(user, secrets.token_urlsafe(24))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private(path, json.dumps({"user": made.user, "password": made.password}) + "\n")
        return made


def private_dir(path: Path, mode: int = 0o700) -> Path:
    """``path``, created if missing, with ``mode`` (0700: its owner's alone)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    return path


@dataclass(frozen=True)
class Launch:
    """Everything needed to spawn one broker process."""

    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None  # run as this user: PostgreSQL refuses to run as root
    logs: tuple[Path, ...] = ()  # where to look when it fails, besides log_path


class Broker(Protocol):
    """What :class:`harness.services.manager.Services` needs to know about one broker."""

    name: str
    title: str  # as users know it: "RabbitMQ"
    package: str  # Debian package, or "pip:<requirement>" for a server from PyPI
    env_var: str  # names the URL of a server the user runs; we then start nothing
    login: str  # the user clients log in as (its password is drawn per broker data)
    stop_signal: int
    crash_signal: int  # a crash that keeps the data: what `mailbench chaos` restarts with
    # False for a server that keeps its queues in memory alone: a restart loses every job,
    # so `mailbench chaos` skips it (with a note) rather than count the jobs as lost.
    keeps_data: bool

    def installed(self, settings: ServiceSettings) -> bool: ...
    def ports(self, settings: ServiceSettings) -> tuple[int, ...]: ...
    def url(self, settings: ServiceSettings, credentials: Credentials) -> str: ...
    # Lay out workdir (config, initdb) and say how to start the server in the foreground.
    def prepare(
        self, settings: ServiceSettings, workdir: Path, credentials: Credentials
    ) -> Launch: ...
    # One probe, polled until it says yes: does the server answer a real request?
    def ready(
        self, settings: ServiceSettings, launch: Launch, credentials: Credentials
    ) -> bool: ...
    # Once it answers: create what clients expect to find (PostgreSQL's database).
    def after_ready(
        self, settings: ServiceSettings, workdir: Path, credentials: Credentials
    ) -> None: ...


def _path(settings: ServiceSettings) -> str:
    return settings.env.get("PATH") or _SYSTEM_PATH


def _base_env(settings: ServiceSettings) -> dict[str, str]:
    # A small, fixed environment: a user's RABBITMQ_* or PG* variables must not leak in
    # and make the private broker differ from one machine to the next.
    return {"PATH": _path(settings), "LANG": "C.UTF-8"}


class Redis:
    name = "redis"
    title = "Redis"
    package = "redis-server"
    env_var = ENV_VARS["redis"]
    # Redis replays its AOF as `default`, and Redis 7.0-7.4 re-check that user's rights in
    # each replayed MULTI/EXEC: with `default` switched off, every transaction of the
    # queue (settles, retries, hand-backs) would be dropped on the restart after a crash
    # (redis/redis#14541). So `default` is the one user, with a password.
    login = "default"
    stop_signal: int = signal.SIGTERM  # Redis flushes the AOF and exits
    # With appendfsync always a reply follows the AOF's write and fsync, so nothing acked
    # is lost; with everysec, see REDIS_FSYNC.
    crash_signal: int = signal.SIGKILL
    keeps_data = True

    def installed(self, settings: ServiceSettings) -> bool:
        return shutil.which("redis-server", path=_path(settings)) is not None

    def ports(self, settings: ServiceSettings) -> tuple[int, ...]:
        return (settings.redis_port,)

    def url(self, settings: ServiceSettings, credentials: Credentials) -> str:
        login = f"{credentials.user}:{credentials.password}"
        return f"redis://{login}@127.0.0.1:{settings.redis_port}/0"

    def prepare(self, settings: ServiceSettings, workdir: Path, credentials: Credentials) -> Launch:
        private_dir(workdir)
        data = private_dir(workdir / "data")
        # The one user there is, in a file only we read: `default`, with a password, so a
        # connection that has not authenticated can do nothing.
        config = workdir / "redis.conf"
        write_private(
            config,
            f"user {credentials.user} on resetpass >{credentials.password} ~* &* +@all\n",
        )
        binary = shutil.which("redis-server", path=_path(settings)) or "redis-server"
        # The AOF, fsynced as chosen (see REDIS_FSYNC); no RDB snapshots: they would fork
        # and compete for the two cores under load.
        argv = [binary, str(config), "--port", str(settings.redis_port), "--bind", "127.0.0.1"]
        argv += ["--dir", str(data), "--appendonly", "yes"]
        argv += ["--appendfsync", settings.redis_fsync]
        argv += ["--daemonize", "no", "--save", "", "--logfile", ""]
        return Launch(argv, workdir / "redis.log", _base_env(settings))

    def ready(self, settings: ServiceSettings, launch: Launch, credentials: Credentials) -> bool:
        hello = f"AUTH {credentials.user} {credentials.password}\r\nPING\r\n".encode()
        try:
            with socket.create_connection(("127.0.0.1", settings.redis_port), timeout=1) as s:
                s.sendall(hello)
                reply = b""
                while reply.count(b"\r\n") < 2 and (chunk := s.recv(64)):
                    reply += chunk
                return reply == b"+OK\r\n+PONG\r\n"
        except OSError:
            return False

    def after_ready(
        self, settings: ServiceSettings, workdir: Path, credentials: Credentials
    ) -> None:
        pass


class RabbitMQ:
    name = "rabbitmq"
    title = "RabbitMQ"
    package = "rabbitmq-server"
    env_var = ENV_VARS["rabbitmq"]
    login = "mailbench"
    # The start script traps SIGTERM and stops the Erlang VM cleanly.
    stop_signal: int = signal.SIGTERM
    crash_signal: int = signal.SIGKILL  # confirms follow the disk write of persistent messages
    keeps_data = True
    node = "mailbench@localhost"

    def _server(self, settings: ServiceSettings) -> Path | None:
        # Debian's /usr/sbin/rabbitmq-server is a wrapper that switches to the rabbitmq
        # user and the system directories; the script behind it honours our variables.
        debian = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
        if debian.exists():
            return debian
        found = shutil.which("rabbitmq-server", path=_path(settings))
        return Path(found) if found and found != "/usr/sbin/rabbitmq-server" else None

    def installed(self, settings: ServiceSettings) -> bool:
        return self._server(settings) is not None

    def ports(self, settings: ServiceSettings) -> tuple[int, ...]:
        return (settings.rabbitmq_port, settings.rabbitmq_dist_port, settings.epmd_port)

    def url(self, settings: ServiceSettings, credentials: Credentials) -> str:
        login = f"{credentials.user}:{credentials.password}"
        return f"amqp://{login}@127.0.0.1:{settings.rabbitmq_port}/"

    def prepare(self, settings: ServiceSettings, workdir: Path, credentials: Credentials) -> Launch:
        private_dir(workdir)  # also HOME, with the Erlang cookie that rules the node
        (workdir / "enabled_plugins").write_text("[].\n")  # no management UI: starts faster
        (workdir / "rabbitmq-env.conf").write_text("")  # shadows /etc/rabbitmq/rabbitmq-env.conf
        write_private(
            workdir / "rabbitmq.conf",
            "# A fresh node creates this user, with every permission on /, instead of the\n"
            "# well-known default one.\n"
            f"default_user = {credentials.user}\n"
            f"default_pass = {credentials.password}\n"
            "# a small test disk must not block publishers with a disk alarm\n"
            "disk_free_limit.absolute = 50MB\n",
        )
        advanced = workdir / "advanced.config"
        if not advanced.exists():  # kept across restarts, as the data is
            # A retry whose way back the main queue did not confirm (it was still recovering
            # after a crash) is tried again after 5 s, not the default 180 s, so a chaos
            # run's drain sees it (docs/modes.md, rabbitmq).
            write_private(
                advanced, "[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, 5000}]}].\n"
            )
        env = _base_env(settings) | {
            "HOME": str(workdir),  # the Erlang cookie lives here; rabbitmqctl needs it too
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(settings.rabbitmq_port),
            "RABBITMQ_DIST_PORT": str(settings.rabbitmq_dist_port),
            # A private epmd on loopback, so no other Erlang node on the machine is touched.
            "ERL_EPMD_PORT": str(settings.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_MNESIA_BASE": str(workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(workdir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(workdir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(workdir / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(workdir / "rabbitmq-env.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(advanced),
        }
        server = self._server(settings)
        node_log = workdir / "log" / f"{self.node}.log"
        return Launch([str(server)], workdir / "rabbitmq.log", env, logs=(node_log,))

    def ready(self, settings: ServiceSettings, launch: Launch, credentials: Credentials) -> bool:
        # The AMQP listener opens near the end of boot; only then is `await_startup`
        # (a second Erlang VM, ~1 s of CPU) worth running. Before the node registers
        # with epmd it fails fast, so it is simply retried.
        if not port_open(settings.rabbitmq_port):
            return False
        ctl = Path(launch.argv[0]).with_name("rabbitmqctl")
        argv = [str(ctl), "-n", self.node, "await_startup", "--timeout", "30"]
        try:
            done = subprocess.run(argv, env=launch.env, capture_output=True, timeout=40)
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0

    def after_ready(
        self, settings: ServiceSettings, workdir: Path, credentials: Credentials
    ) -> None:
        pass


class Postgres:
    name = "postgres"
    title = "PostgreSQL"
    package = "postgresql"
    env_var = ENV_VARS["postgres"]
    login = "postgres"  # the superuser initdb makes, now with a password
    # SIGINT is the "fast" shutdown; SIGTERM ("smart") waits for every client to leave.
    stop_signal: int = signal.SIGINT
    # "Immediate" shutdown: no checkpoint, crash recovery from the WAL on the next start.
    # (SIGKILL to the postmaster would leave its backends holding the shared memory.)
    crash_signal: int = signal.SIGQUIT
    keeps_data = True
    user = "postgres"

    def bin_dir(self, settings: ServiceSettings) -> Path | None:
        on_path = shutil.which("postgres", path=_path(settings))
        if on_path and shutil.which("initdb", path=_path(settings)):
            return Path(on_path).resolve().parent  # Debian's symlinks lead to pg_isready
        # Debian keeps the server binaries off PATH; take the newest major version.
        candidates = glob.glob("/usr/lib/postgresql/*/bin/postgres")
        newest = max(candidates, key=lambda p: int(Path(p).parts[-3]), default=None)
        return Path(newest).parent if newest else None

    def installed(self, settings: ServiceSettings) -> bool:
        return self.bin_dir(settings) is not None

    def ports(self, settings: ServiceSettings) -> tuple[int, ...]:
        return (settings.postgres_port,)

    def url(self, settings: ServiceSettings, credentials: Credentials) -> str:
        login = f"{credentials.user}:{credentials.password}"
        return f"postgresql://{login}@127.0.0.1:{settings.postgres_port}/mailbench"

    def _run_as(self) -> str | None:
        return self.user if os.geteuid() == 0 else None

    def prepare(self, settings: ServiceSettings, workdir: Path, credentials: Credentials) -> Launch:
        bin_dir = self.bin_dir(settings)
        assert bin_dir is not None, "checked by installed()"
        run_as = self._run_as()
        account = _account(run_as) if run_as is not None else None
        # The postgres user must pass through our directory to its data: search, no listing.
        private_dir(workdir, 0o711 if account is not None else 0o700)
        data = private_dir(workdir / "data")  # also the socket's directory
        if account is not None:
            _check_reachable(workdir, account)
            os.chown(data, account.pw_uid, account.pw_gid)
        env = _base_env(settings)
        if not (data / "PG_VERSION").exists():
            init_log = workdir / "initdb.log"
            # The superuser's password, for initdb alone to read, gone once it has run.
            password_file = workdir / "initdb.password"
            write_private(password_file, credentials.password + "\n")
            if account is not None:
                os.chown(password_file, account.pw_uid, account.pw_gid)
            argv = [str(bin_dir / "initdb"), "-D", str(data), "--no-sync"]
            # SCRAM for every connection, over TCP and the Unix socket alike.
            argv += ["--auth=scram-sha-256", f"--pwfile={password_file}"]
            argv += ["-U", credentials.user, "--encoding=UTF8", "--locale=C"]
            try:
                with _private_log(init_log) as out:
                    done = subprocess.run(
                        argv, stdout=out, stderr=subprocess.STDOUT, env=env, **as_user(run_as)
                    )
            finally:
                password_file.unlink(missing_ok=True)
            if done.returncode != 0:
                raise ServiceUnavailable(
                    f"PostgreSQL's initdb failed with exit code {done.returncode}: see {init_log}."
                )
        # The socket path must fit in sun_path (108 bytes); without it, TCP alone is fine.
        socket_dir = str(data) if len(str(data)) < 90 else ""
        argv = [str(bin_dir / "postgres"), "-D", str(data), "-k", socket_dir]
        argv += ["-c", "listen_addresses=127.0.0.1", "-p", str(settings.postgres_port)]
        argv += ["-c", "fsync=on", "-c", "unix_socket_permissions=0700"]
        return Launch(argv, workdir / "postgres.log", env, user=run_as)

    def ready(self, settings: ServiceSettings, launch: Launch, credentials: Credentials) -> bool:
        isready = Path(launch.argv[0]).with_name("pg_isready")
        argv = [str(isready), "-q", "-h", "127.0.0.1", "-p", str(settings.postgres_port)]
        argv += ["-U", credentials.user, "-d", "postgres"]
        try:
            return subprocess.run(argv, env=launch.env, timeout=10).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def after_ready(
        self, settings: ServiceSettings, workdir: Path, credentials: Credentials
    ) -> None:
        bin_dir = self.bin_dir(settings)
        assert bin_dir is not None
        argv = [str(bin_dir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1"]
        argv += ["-h", "127.0.0.1", "-p", str(settings.postgres_port), "-U", credentials.user]
        argv += ["-d", "postgres"]
        # CREATE DATABASE has no IF NOT EXISTS; \gexec runs it only when it is missing.
        script = (
            "SELECT 'CREATE DATABASE mailbench' "
            "WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mailbench')\\gexec\n"
        )
        # The password in psql's environment, which only we can read (not on its argv).
        env = _base_env(settings) | {"PGPASSWORD": credentials.password}
        done = subprocess.run(argv, input=script.encode(), capture_output=True, env=env, timeout=30)
        if done.returncode != 0:
            detail = done.stderr.decode(errors="replace").strip()
            raise ServiceUnavailable(f"PostgreSQL could not create database mailbench: {detail}")


def _private_log(path: Path) -> BinaryIO:
    """``path`` opened for appending, created readable by its owner alone."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")


def open_log(path: Path) -> BinaryIO:
    """A broker's log, for appending: only its owner reads it (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = _private_log(path)
    path.chmod(0o600)  # also when an earlier run made it
    return out


def _account(user: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(user)
    except KeyError:
        raise ServiceUnavailable(
            f"PostgreSQL refuses to run as root and there is no `{user}` user to run it as: "
            "reinstall the postgresql package, or set DATABASE_URL to an existing server."
        ) from None


def _check_reachable(directory: Path, account: pwd.struct_passwd) -> None:
    """Fail with one sentence if ``account`` cannot walk down to ``directory``."""
    groups = {account.pw_gid} | {g.gr_gid for g in grp.getgrall() if account.pw_name in g.gr_mem}
    for step in [*reversed(directory.parents), directory]:
        st = step.stat()
        mode = stat.S_IMODE(st.st_mode)
        if (
            (st.st_uid == account.pw_uid and mode & 0o100)
            or (st.st_gid in groups and mode & 0o010)
            or mode & 0o001
        ):
            continue
        raise ServiceUnavailable(
            f"PostgreSQL runs as the user {account.pw_name}, which cannot enter {step}: "
            f"use a services directory it can reach (under /tmp, say) or `chmod o+x {step}`."
        )


class UserArgs(TypedDict, total=False):
    user: int
    group: int
    extra_groups: list[int]


def as_user(user: str | None) -> UserArgs:
    """Popen arguments that run the child as ``user`` directly, with no runuser in between.

    The server then stays our direct child, so waiting on it reaps it.
    """
    if user is None:
        return {}
    account = pwd.getpwnam(user)
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def ensure_installed(broker: Broker, settings: ServiceSettings) -> None:
    """Install a missing broker with apt-get if allowed, else say how to get one."""
    if broker.installed(settings):
        return
    if broker.package.startswith("pip:"):  # not apt's: PyPI's, in mailbench's own venv
        requirement = broker.package.removeprefix("pip:")
        raise ServiceUnavailable(
            f"{broker.title} is not installed: run `make install` or `pip install "
            f"'{requirement}'`, or set {broker.env_var} to an existing server."
        )
    hint = (
        f"run `apt-get install {broker.package}`, or set {broker.env_var} to an existing "
        f"server, or `docker compose up -d {broker.name}`"
    )
    if not settings.install:
        raise ServiceUnavailable(f"{broker.title} is not installed: {hint}.")
    install_log = settings.base_dir / f"apt-{broker.package}.log"
    install_log.parent.mkdir(parents=True, exist_ok=True)
    log.info("%s is not installed: installing %s with apt-get", broker.title, broker.package)
    try:
        _apt_update(install_log)
        # Without systemd, and with Docker's policy-rc.d, the package's own service is
        # not started; with systemd it is, on the default ports, which ours avoid.
        _apt(["install", "-y", "-q", "--no-install-recommends", broker.package], install_log)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ServiceUnavailable(
            f"Installing {broker.package} with apt-get failed ({exc}; see {install_log}): {hint}."
        ) from exc
    if not broker.installed(settings):
        raise ServiceUnavailable(f"{broker.title} is still missing after apt-get: {hint}.")


@cache
def _apt_update(install_log: Path) -> None:
    # Once per process: the package lists do not change between two brokers.
    _apt(["update", "-q"], install_log)


def _apt(args: list[str], install_log: Path) -> None:
    env = {"PATH": _SYSTEM_PATH, "DEBIAN_FRONTEND": "noninteractive"}
    with install_log.open("ab") as out:
        subprocess.run(
            ["apt-get", *args], stdout=out, stderr=subprocess.STDOUT, env=env, check=True
        )


# moto's server, quiet: werkzeug would log a line per request, thousands a second.
_MOTO = (
    "import logging, sys; logging.getLogger('werkzeug').setLevel(logging.WARNING); "
    "from moto.server import main; main(sys.argv[1:])"
)


class SQS:
    """moto in server mode: the SQS API, in memory (a restart empties it).

    It checks no signature, so the URL carries no credentials: anyone on the machine
    who finds its port on loopback can use its queues (docs/modes.md, sqs).
    """

    name = "sqs"
    title = "SQS (moto)"
    package = "pip:moto[server]"
    env_var = ENV_VARS["sqs"]
    login = "mailbench"
    stop_signal: int = signal.SIGTERM
    crash_signal: int = signal.SIGKILL  # loses every queue: chaos skips the restart
    keeps_data = False  # what chaos asks before it restarts a broker

    def installed(self, settings: ServiceSettings) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in ("moto", "flask_cors"))

    def ports(self, settings: ServiceSettings) -> tuple[int, ...]:
        return (settings.sqs_port,)

    def url(self, settings: ServiceSettings, credentials: Credentials) -> str:
        return f"sqs://127.0.0.1:{settings.sqs_port}?region=us-east-1"

    def prepare(self, settings: ServiceSettings, workdir: Path, credentials: Credentials) -> Launch:
        private_dir(workdir)
        argv = [sys.executable, "-c", _MOTO, "-H", "127.0.0.1", "-p", str(settings.sqs_port)]
        return Launch(argv, workdir / "moto.log", _base_env(settings))

    def ready(self, settings: ServiceSettings, launch: Launch, credentials: Credentials) -> bool:
        url = f"http://127.0.0.1:{settings.sqs_port}/moto-api/data.json"
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                return reply.status == 200 and isinstance(json.loads(reply.read()), dict)
        except (OSError, ValueError):
            return False

    def after_ready(
        self, settings: ServiceSettings, workdir: Path, credentials: Credentials
    ) -> None:
        pass


_ALL: tuple[Broker, ...] = (RabbitMQ(), Redis(), Postgres(), SQS())
BROKERS: dict[str, Broker] = {b.name: b for b in _ALL}
