"""Starting and stopping the processes mailbench runs: servers, workers, Locust and brokers.

Each process runs in a session of its own: the terminal's Ctrl-C reaches the harness
alone, which stops its children in order, and one ``killpg`` reaches a child's whole group
(Locust's ``--processes`` workers). Should the harness die without cleaning up (SIGKILL,
the OOM killer), the kernel sends its children SIGTERM (``PR_SET_PDEATHSIG``); it ties
that to the *thread* that forked, so only children started from the main thread ask.

Brokers leave processes that are not our children: RabbitMQ's Erlang VM runs under a
shell wrapper and starts ``erl_child_setup`` and ``inet_gethost`` in sessions of their
own, and ``epmd`` double-forks to PID 1. So a process is remembered as a :class:`Pid`
(number plus start time, which makes a recycled PID harmless), a broker's tree is read
before anything is signalled, the rest is found by a tag in its environment, and every
survivor is stopped by its own PID. Nothing here ever selects a process by its name.

One signal policy, set by the entry point of a command that owns children (``harness.cli``):
SIGTERM raises the ``KeyboardInterrupt`` of Ctrl-C (:func:`sigterm_interrupts`). The
owners only clean up on exit, the signals held off meanwhile (:func:`signals_deferred`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

import httpx
import psutil

from harness.errors import ProcessFailed
from servers.identity import IDENTITY_VAR

log = logging.getLogger(__name__)

# Set in every broker's environment and inherited by everything it spawns (epmd
# included), so all of a broker's processes can be found again, whatever their session.
TAG_VAR = "MAILBENCH_SERVICE_TAG"
_PR_SET_PDEATHSIG = 1
_POLL_S = 0.05
_GONE = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
# What answers on a child's port: the token it gives (servers.identity), "" for an answer
# without one, None while nothing answers.
Identify = Callable[[], str | None]


def _main_thread() -> bool:
    """Signal handlers and PDEATHSIG both belong to the main thread only."""
    return threading.current_thread() is threading.main_thread()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """The signal policy of a command that owns children: SIGTERM raises KeyboardInterrupt,
    as Ctrl-C does, so every ``with`` block of the harness stops what it started."""
    if not _main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)  # None: not set from Python


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold off Ctrl-C and SIGTERM while processes are started or stopped, then deliver
    them to whatever handles them outside (the policy above, or the default).

    A signal in the middle would leave a process started but unrecorded, or a second
    Ctrl-C in a shutdown would leave the rest behind.
    """
    if not _main_thread():
        yield
        return
    caught: list[int] = []

    def note(signum: int, frame: FrameType | None) -> None:
        log.warning("signal %d: finishing what was started or stopped first", signum)
        caught.append(signum)

    saved = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler or signal.SIG_DFL)
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)


def _die_with_parent() -> None:
    """preexec_fn: the kernel sends the child SIGTERM when the thread that forked it ends."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(
    argv: Sequence[str],
    out: IO[bytes],
    *,
    env: Mapping[str, str],
    cwd: Path | None = None,
    attached: bool = True,
    user: int | None = None,
    group: int | None = None,
    extra_groups: list[int] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a session of its own; ``attached``: it dies with the harness."""
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env=dict(env),
        start_new_session=True,
        preexec_fn=(
            _die_with_parent if attached and sys.platform == "linux" and _main_thread() else None
        ),
        user=user,
        group=group,
        extra_groups=extra_groups,
    )


# The project's folder: its second venvs (.venv-<name>) are made there, beside .venv.
PROJECT_DIR = Path(__file__).resolve().parents[1]
VENV_PYTHON_VAR = "MAILBENCH_PYTHON_{}"  # e.g. MAILBENCH_PYTHON_ARQ: that venv's python


def venv_python(venv: str | None) -> str:
    """The interpreter of the project's venv ``.venv-<venv>`` (or the one the
    ``MAILBENCH_PYTHON_<VENV>`` variable names); ``None``: the harness's own."""
    if venv is None:
        return sys.executable
    given = os.environ.get(VENV_PYTHON_VAR.format(venv.upper().replace("-", "_")))
    python = Path(given) if given else PROJECT_DIR / f".venv-{venv}" / "bin" / "python"
    if not python.is_file():
        raise ProcessFailed(
            f"{python} is missing: the modes that need the venv .venv-{venv} run in it "
            f"(`make install` makes it, or pip install -e '.[{venv}]' in a venv of its own)"
        )
    return str(python)


def mailbench_command(*args: str, python: str | None = None) -> list[str]:
    """Run a mailbench subcommand with the same interpreter as the harness, or with that
    of the project's venv ``.venv-<python>`` (a mode's :attr:`~servers.modes.Mode.python`)."""
    return [venv_python(python), "-m", "harness.cli", *args]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_taken(port: int) -> bool:
    """Whether something listens on the port (on loopback or on all addresses)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR, as servers set it: TIME_WAIT leftovers of a broker that just
        # stopped must not count as taken, only a live listener.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def answered_identity(url: str, timeout: float = 1.0) -> str | None:
    """The ``identity`` in the JSON object ``url`` answers (see :data:`Identify`)."""
    try:
        response = httpx.get(url, timeout=timeout)
    except httpx.HTTPError:
        return None
    try:
        answer = response.json()
    except ValueError:
        return ""
    return str(answer.get("identity") or "") if isinstance(answer, dict) else ""


class Child:
    """One child of the harness and its log.

    Each child gets a token of its own in its environment (:mod:`servers.identity`); a
    server answers it, so that :func:`wait_ready` can tell it from a stranger on its port.
    """

    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.identity = secrets.token_urlsafe(16)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        log.debug("starting %s: %s", name, " ".join(argv))
        environment = {**os.environ, **(env or {}), IDENTITY_VAR: self.identity}
        try:
            self.process = spawn(argv, self._log, env=environment)
        except BaseException:
            self._log.close()
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def check_alive(self) -> None:
        if not self.alive():
            raise ProcessFailed(
                f"{self.name} exited with code {self.process.returncode}; "
                f"its log {self.log_path} ends with:\n{self.tail()}"
            )

    def wait_http(self, url: str, timeout: float = 30.0) -> None:
        """Wait until ``url`` answers any HTTP status, or fail naming the log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                httpx.get(url, timeout=1.0)
                return
            except httpx.HTTPError:
                time.sleep(_POLL_S)
        raise ProcessFailed(
            f"{self.name} did not answer {url} within {timeout:.0f} s; see {self.log_path}"
        )

    def wait_port_file(self, path: Path, timeout: float = 30.0) -> int:
        """The port a child started on port 0 wrote to ``path`` once it listened."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                return int(path.read_text())
            self.check_alive()
            time.sleep(_POLL_S)
        raise ProcessFailed(
            f"{self.name} did not say which port it listens on within {timeout:.0f} s; "
            f"see {self.log_path}"
        )

    def wait_listening(self, port: int, timeout: float = 30.0) -> None:
        """Wait until the child, or a process of its tree (a server's workers), listens
        on ``port``: a process started by its command alone, whatever it answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            for member in self.tree():
                with contextlib.suppress(psutil.Error):
                    sockets = psutil.Process(member.pid).net_connections(kind="tcp")
                    listening = (s.laddr.port for s in sockets if s.status == psutil.CONN_LISTEN)
                    if port in listening:
                        return
            time.sleep(_POLL_S)
        raise ProcessFailed(
            f"{self.name} did not listen on port {port} within {timeout:.0f} s; see {self.log_path}"
        )

    def tree(self) -> list[Pid]:
        """The child and its living descendants, whatever their process group: a
        framework's worker forks processes that leave it (RQ's work-horses ``setpgrp``)."""
        leader = Pid.of(self.process.pid) if self.alive() else None
        return family(leader) if leader is not None else []

    def stop(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> int | None:
        """Ask the whole process group to stop; kill it if it does not within ``timeout``.
        SIGKILL is a crash: the whole tree dies at once (:meth:`_freeze`)."""
        members = self._freeze() if sig == signal.SIGKILL else self.tree()
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing it", self.name, timeout)
        # Whatever is left of the group (children of the child) goes too, and so does
        # every descendant seen before, which its death made an orphan of PID 1.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for member in members:
            member.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        _wait_gone(members, time.monotonic() + 5.0, reap=False)
        self._log.close()
        return self.process.returncode

    def _freeze(self) -> list[Pid]:
        """SIGSTOP the child's whole tree, until it forks no more, and return it: killed
        one by one, a parent would notice its child's death (RQ's worker marks the job
        failed when its work-horse dies) or a child its parent's, which a crash of the
        host or container never lets them do."""
        frozen: list[Pid] = []
        while fresh := [p for p in self.tree() if p not in frozen]:
            for p in fresh:
                p.signal(signal.SIGSTOP)
            frozen += fresh
        return frozen


def wait_ready(
    children: Sequence[Child],
    identify: Identify,
    port: int,
    *,
    what_to_do: str,
    timeout: float = 30.0,
) -> None:
    """Wait until each of ``children`` (processes that share ``port``) has answered
    ``identify`` with its own token.

    Any other answer comes from a process the harness did not just start: the port is
    taken, and this fails at once with one sentence naming the port and ``what_to_do``,
    before anything is reset or measured. So it does when a child has exited while the
    port answers. Polls make new connections, so the kernel spreads them over processes
    sharing the port (``SO_REUSEPORT``) and each one is heard from.
    """
    ours = {child.identity for child in children}
    waiting = set(ours)
    names = " and ".join(dict.fromkeys(child.name for child in children))
    deadline = time.monotonic() + timeout

    def taken() -> ProcessFailed:
        return ProcessFailed(
            f"Port {port} is taken by another process, not the {names} mailbench just "
            f"started; {what_to_do}."
        )

    while waiting:
        answer = identify()
        if answer is not None and answer not in ours:
            raise taken()
        waiting.discard(answer or "")
        for child in children:
            # Ours could not bind, and something else listens there (maybe not HTTP).
            if not child.alive() and waiting == ours and port_open(port):
                raise taken()
            child.check_alive()
        if not waiting:
            return
        if time.monotonic() >= deadline:
            raise ProcessFailed(
                f"{names} did not answer on port {port} within {timeout:.0f} s; "
                f"see {children[0].log_path}"
            )
        if answer is None:
            time.sleep(_POLL_S)


class Children:
    """Every child the harness started; a context manager that stops them all on exit
    (Ctrl-C and SIGTERM included, once the entry point's policy makes SIGTERM unwind)."""

    def __init__(self) -> None:
        self._children: list[Child] = []

    def start(
        self, name: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
    ) -> Child:
        with signals_deferred():  # recorded as soon as it exists, so stop_all finds it
            child = Child(name, argv, log_path, env)
            self._children.append(child)
        return child

    def stop(self, child: Child, timeout: float = 15.0) -> int | None:
        return self._forget(child, child.stop(timeout))

    def kill(self, child: Child) -> int | None:
        """SIGKILL ``child``'s whole group, as a crash would (no cleanup, no metrics)."""
        return self._forget(child, child.stop(timeout=5.0, sig=signal.SIGKILL))

    def _forget(self, child: Child, code: int | None) -> int | None:
        if child in self._children:
            self._children.remove(child)
        return code

    def stop_all(self) -> None:
        for child in reversed(self._children):
            child.stop(timeout=10.0)
        self._children.clear()

    def __enter__(self) -> Children:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with signals_deferred():
            self.stop_all()


def _identify(pid: int) -> tuple[psutil.Process, float] | None:
    """The process and its start time in seconds after boot (psutil adds the boot time,
    which moves when the clock is set: it is taken off again), or None if there is none."""
    try:
        boot = psutil.boot_time()
        process = psutil.Process(pid)
        return process, round(float(process.create_time()) - float(boot), 2)
    except psutil.Error:
        return None


@dataclass(frozen=True)
class Pid:
    """A process, identified so that a later signal cannot hit a stranger with its PID."""

    pid: int
    started: float  # seconds after boot

    @classmethod
    def of(cls, pid: int) -> Pid | None:
        found = _identify(pid)
        return None if found is None else cls(pid, found[1])

    def _process(self) -> psutil.Process | None:
        """This very process, zombie or not; None once its PID is free or someone else's."""
        found = _identify(self.pid)
        return found[0] if found is not None and found[1] == self.started else None

    def alive(self) -> bool:
        """True while the process runs; a zombie counts as gone (it holds no resources)."""
        process = self._process()
        try:
            return process is not None and process.status() not in _GONE
        except psutil.Error:
            return False

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def as_json(self) -> dict[str, int | float]:
        return {"pid": self.pid, "started": self.started}

    @classmethod
    def from_json(cls, data: Mapping[str, int | float]) -> Pid:
        started = data["started"]
        if isinstance(started, int):  # clock ticks, as state files before psutil held it
            started = round(started / os.sysconf("SC_CLK_TCK"), 2)
        return cls(int(data["pid"]), float(started))


def family(leader: Pid) -> list[Pid]:
    """The leader and all its living descendants, read in one pass."""
    process = leader._process()
    if process is None:
        return []
    try:
        descendants = process.children(recursive=True)
    except psutil.Error:
        descendants = []
    found = [leader, *(p for d in descendants if (p := Pid.of(d.pid)) is not None)]
    return [p for p in found if p.alive()]


def with_environment(marker: Mapping[str, str]) -> list[Pid]:
    """Living processes whose environment holds every ``marker`` pair.

    This is how the ``epmd`` a RabbitMQ node spawned is found: it inherits the broker's
    tag (and the node's private ``ERL_EPMD_PORT``), which nothing else shares.
    """
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if marker.items() <= process.environ().items() and (p := Pid.of(process.pid)):
                found.append(p)
    return [p for p in found if p.alive()]


def _wait_gone(pids: Iterable[Pid], deadline: float, reap: bool) -> list[Pid]:
    remaining = list(pids)
    while True:
        if reap:
            # A detached broker that this same process started (`services up` called from
            # a test) is still our child: reap it, or it lingers as our zombie.
            for p in remaining:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(p.pid, os.WNOHANG)
        remaining = [p for p in remaining if p.alive()]
        if not remaining or time.monotonic() >= deadline:
            return remaining
        time.sleep(_POLL_S)


def terminate(
    leader: Pid,
    *,
    sig: int = signal.SIGTERM,
    helpers: Iterable[Pid] = (),
    popen: subprocess.Popen[bytes] | None = None,
    timeout: float = 10.0,
) -> list[Pid]:
    """Stop a broker's process group, then each leftover process by PID; return survivors.

    ``sig`` goes to the group the leader heads (it was started in a new session), the
    polite way to stop that broker; whatever still runs after ``timeout`` gets SIGKILL.
    ``helpers`` (epmd) are stopped after the broker, which unregisters from them.
    """
    members = family(leader)
    process = leader._process()
    own_child = False  # a detached broker that this very process started
    with contextlib.suppress(psutil.Error):
        own_child = popen is None and process is not None and process.ppid() == os.getpid()

    def leader_gone(within: float) -> bool:
        if popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(within)
            return popen.poll() is not None
        return not _wait_gone([leader], time.monotonic() + within, reap=own_child)

    _signal_group(leader, sig)
    if not leader_gone(timeout):
        log.warning("pid %d ignored signal %d for %.0f s: killing it", leader.pid, sig, timeout)
        _signal_group(leader, signal.SIGKILL)
        leader_gone(5.0)
    # Members in other sessions (erl_child_setup, postgres backends) leave with their
    # parent; give them a moment, then kill the stragglers one by one.
    left = _wait_gone(members, time.monotonic() + 2.0, reap=own_child)
    for p in left:
        p.signal(signal.SIGKILL)
    for p in helpers:
        p.signal(signal.SIGTERM)
    left = _wait_gone([*left, *helpers], time.monotonic() + 2.0, reap=own_child)
    for p in left:
        p.signal(signal.SIGKILL)
    return _wait_gone(left, time.monotonic() + 1.0, reap=own_child)


def _signal_group(leader: Pid, sig: int) -> None:
    # An unreaped zombie leader still pins its group id, so the group is still ours.
    if leader._process() is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader.pid, sig)
