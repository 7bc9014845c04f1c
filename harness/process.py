"""Child processes whose lifetime is the harness's.

Each child runs in its own session (so a stop reaches its whole process tree, Locust's
``--processes`` workers included) and asks the kernel to kill it if the harness dies
(``PR_SET_PDEATHSIG``), so neither Ctrl-C nor a crash of the harness leaves orphans.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType

import httpx

from harness.errors import ProcessFailed

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mailbench_command(*args: str) -> list[str]:
    """Run a mailbench subcommand with the same interpreter as the harness."""
    return [sys.executable, "-m", "harness.cli", *args]


class Child:
    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        log.debug("starting %s: %s", name, " ".join(argv))
        self.process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            # The kernel ties PDEATHSIG to the thread that forks: a child started from a
            # helper thread would get SIGTERM when that thread ends. Such children are
            # stopped by Children.stop_all instead.
            preexec_fn=_die_with_parent if sys.platform == "linux" and _main_thread() else None,
        )

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
                time.sleep(0.05)
        raise ProcessFailed(
            f"{self.name} did not answer {url} within {timeout:.0f} s; see {self.log_path}"
        )

    def stop(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> int | None:
        """Ask the whole process group to stop; kill it if it does not within ``timeout``."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing it", self.name, timeout)
        # Whatever is left of the group (children of the child) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        self._log.close()
        return self.process.returncode


class Children:
    """Every child the harness started; all are stopped on exit, Ctrl-C or SIGTERM."""

    def __init__(self) -> None:
        self._children: list[Child] = []
        self._previous_sigterm: object = None

    def start(
        self, name: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
    ) -> Child:
        child = Child(name, argv, log_path, env)
        self._children.append(child)
        return child

    def stop(self, child: Child, timeout: float = 15.0) -> int | None:
        code = child.stop(timeout)
        if child in self._children:
            self._children.remove(child)
        return code

    def kill(self, child: Child) -> int | None:
        """SIGKILL ``child``'s whole group, as a crash would (no cleanup, no metrics)."""
        code = child.stop(timeout=5.0, sig=signal.SIGKILL)
        if child in self._children:
            self._children.remove(child)
        return code

    def stop_all(self) -> None:
        for child in reversed(self._children):
            child.stop(timeout=10.0)
        self._children.clear()

    def __enter__(self) -> Children:
        self._previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()
        signal.signal(signal.SIGTERM, self._previous_sigterm)  # type: ignore[arg-type]


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def children() -> Iterator[Children]:
    with Children() as group:
        yield group
