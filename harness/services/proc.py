"""Process plumbing for :mod:`harness.services.manager`: find, signal and reap broker processes.

Brokers leave processes that are not our children: RabbitMQ's Erlang VM runs under a shell
wrapper and starts ``erl_child_setup`` and ``inet_gethost`` in sessions of their own, and
``epmd`` double-forks to PID 1. So a process is remembered as a :class:`Pid` (number plus
kernel start time, which makes a recycled PID harmless), the tree is read from ``/proc``
before anything is signalled, and every survivor is then stopped by its own PID. Nothing
here ever selects a process by its name.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)

# Set in every broker's environment and inherited by everything it spawns (epmd
# included), so all of a broker's processes can be found again, whatever their session.
TAG_VAR = "MAILBENCH_SERVICE_TAG"
_PR_SET_PDEATHSIG = 1
_POLL_S = 0.05


@dataclass(frozen=True)
class Pid:
    """A process, identified so that a later signal cannot hit a stranger with its PID."""

    pid: int
    started: int  # /proc/<pid>/stat field 22: clock ticks after boot

    @classmethod
    def of(cls, pid: int) -> Pid | None:
        stat = _stat(pid)
        return None if stat is None else cls(pid, stat[3])

    def alive(self) -> bool:
        """True while the process runs; a zombie counts as gone (it holds no resources)."""
        stat = _stat(self.pid)
        return stat is not None and stat[0] not in "ZX" and stat[3] == self.started

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def as_json(self) -> dict[str, int]:
        return {"pid": self.pid, "started": self.started}

    @classmethod
    def from_json(cls, data: Mapping[str, int]) -> Pid:
        return cls(int(data["pid"]), int(data["started"]))


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgid, start time) of a process, or None if there is no such PID."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    rest = raw[raw.rindex(")") + 2 :].split()
    return rest[0], int(rest[1]), int(rest[2]), int(rest[19])


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def family(leader: Pid) -> list[Pid]:
    """The leader and all its living descendants, read from /proc in one pass."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        stat = _stat(pid)
        if stat is not None and stat[0] not in "ZX":
            children.setdefault(stat[1], []).append(pid)
    found, todo = [leader], list(children.get(leader.pid, []))
    while todo:
        pid = todo.pop()
        if (member := Pid.of(pid)) is not None:
            found.append(member)
            todo.extend(children.get(pid, []))
    return [p for p in found if p.alive()]


def with_environment(marker: Mapping[str, str]) -> list[Pid]:
    """Living processes whose environment holds every ``marker`` pair.

    This is how the ``epmd`` a RabbitMQ node spawned is found: it inherits the node's
    private ``ERL_EPMD_PORT`` and ``RABBITMQ_MNESIA_BASE``, which nothing else shares.
    """
    wanted = {f"{k}={v}".encode() for k, v in marker.items()}
    found = []
    for pid in _all_pids():
        try:
            environ = set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if wanted <= environ and (member := Pid.of(pid)) is not None and member.alive():
            found.append(member)
    return found


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
    own_child = popen is None and _is_our_child(leader.pid)

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
    stat = _stat(leader.pid)
    if stat is not None and stat[3] == leader.started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader.pid, sig)


def _is_our_child(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[1] == os.getpid()


def die_with_us() -> None:
    """preexec_fn: the kernel sends SIGTERM to the child if the starting thread dies.

    A safety net for a harness killed by SIGKILL or the OOM killer, which runs no cleanup.
    The kernel ties this to the *thread* that forked, so it is only used from the main
    thread, whose life is the process's.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


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


def exit_on_signal(signum: int, frame: FrameType | None) -> None:
    """A SIGTERM handler: unwind like Ctrl-C does, so context managers clean up."""
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold off Ctrl-C and SIGTERM while brokers are being stopped, then honour them.

    A second Ctrl-C in the middle of a shutdown would otherwise leave brokers behind.
    """
    if not in_main_thread():
        yield
        return
    caught: list[int] = []

    def note(signum: int, frame: FrameType | None) -> None:
        log.warning("signal %d: stopping the services first", signum)
        caught.append(signum)

    saved = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    if signal.SIGINT in caught:
        raise KeyboardInterrupt
    if signal.SIGTERM in caught:
        raise SystemExit(128 + signal.SIGTERM)
