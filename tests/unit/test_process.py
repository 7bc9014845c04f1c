"""harness.process: processes are told apart by start time, whole trees are found and
stopped, and SIGTERM to a ``mailbench`` command that owns children leaves none alive.

What runs is checked independently of the code under test where it matters: start times
and parent links are read from /proc here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from harness.process import (
    TAG_VAR,
    Children,
    Pid,
    family,
    free_port,
    port_taken,
    signals_deferred,
    sigterm_interrupts,
    spawn,
    terminate,
    with_environment,
)
from harness.services.manager import Services
from harness.services.settings import ServiceSettings

REPO = Path(__file__).resolve().parents[2]


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def _running(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _descendants(root: int) -> set[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            parents[int(entry)] = int(stat[1])
    found: set[int] = set()
    todo = [root]
    while todo:
        parent = todo.pop()
        kids = {pid for pid, ppid in parents.items() if ppid == parent} - found
        todo.extend(kids)
        found |= kids
    return found


def _wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def stray() -> Iterator[Callable[[Iterable[int]], None]]:
    """Note processes a test started; whatever of them still runs afterwards is killed
    (told apart by start time, so a recycled PID is left alone)."""
    noted: list[Pid] = []
    yield lambda pids: noted.extend(p for pid in pids if (p := Pid.of(pid)) is not None)
    for p in noted:
        p.signal(signal.SIGKILL)


# --- Pid ---------------------------------------------------------------------------------


def test_a_pid_is_its_number_and_start_time() -> None:
    me = Pid.of(os.getpid())
    assert me is not None and me.alive()
    # The kernel's own start time (clock ticks after boot), read here from /proc.
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    assert me == Pid.from_json({"pid": os.getpid(), "started": ticks})  # a state file's
    assert Pid.from_json(me.as_json()) == me
    # The same number with another start time is a recycled PID: a stranger.
    assert not Pid(me.pid, me.started + 1).alive()
    assert family(Pid(me.pid, me.started + 1)) == []


def test_a_free_pid_is_none_and_a_zombie_is_gone() -> None:
    child = subprocess.Popen(["true"])
    # Wait for it to exit without reaping it: it is a zombie until wait().
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
    zombie = Pid.of(child.pid)
    assert zombie is not None and not zombie.alive()
    assert (_stat(child.pid) or ["gone"])[0] == "Z"
    child.wait()
    assert Pid.of(child.pid) is None
    zombie.signal(signal.SIGKILL)  # nothing to signal, nothing raised


# --- a broker-like tree: a group, a member of its own session, a daemon -------------------

_TREE = """
import os, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # same group
subprocess.Popen([sys.executable, "-c", "import os, time; os.setsid(); time.sleep(60)"])
middle = os.fork()
if middle == 0:  # a daemon, as epmd: double fork, own session, parent PID 1
    os.setsid()
    if os.fork() == 0:
        time.sleep(60)
    os._exit(0)
os.waitpid(middle, 0)
print("ready", flush=True)
time.sleep(60)
"""


def test_terminate_stops_the_tree_and_the_processes_found_by_their_tag(
    tmp_path: Path, stray: Callable[[Iterable[int]], None]
) -> None:
    tag = uuid.uuid4().hex
    with (tmp_path / "tree.log").open("ab") as out:
        popen = spawn([sys.executable, "-c", _TREE], out, env={**os.environ, TAG_VAR: tag})
    leader = Pid.of(popen.pid)
    assert leader is not None
    _wait_for(lambda: "ready" in (tmp_path / "tree.log").read_text())
    tree = _descendants(popen.pid)
    tagged = with_environment({TAG_VAR: tag})
    stray([*tree, *(p.pid for p in tagged)])
    assert len(tree) == 2  # the daemon left the tree
    assert {p.pid for p in family(leader)} == {popen.pid, *tree}
    daemons = {p.pid for p in tagged} - tree - {popen.pid}
    assert len(daemons) == 1 and all(_running(p) for p in daemons)
    assert with_environment({TAG_VAR: "another tag"}) == []

    assert terminate(leader, helpers=tagged, popen=popen, timeout=5) == []
    assert popen.returncode == -signal.SIGTERM
    assert [p for p in {popen.pid, *tree, *daemons} if _running(p)] == []
    assert family(leader) == []


# --- a framework worker's tree: RQ's pool forks workers, which fork work-horses -----------

_POOL = """
import os, sys, time
for _ in range(2):  # workers, in the pool's group
    if os.fork() == 0:
        if os.fork() == 0:  # a work-horse, in a group of its own (RQ's setpgrp)
            os.setpgrp()
            time.sleep(60)
            os._exit(0)
        time.sleep(60)
        os._exit(0)
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_worker_tree_goes_whole_work_horses_included(
    how: str, tmp_path: Path, stray: Callable[[Iterable[int]], None]
) -> None:
    with Children() as children:
        log = tmp_path / "pool.log"
        pool = children.start("pool", [sys.executable, "-c", _POOL], log)
        _wait_for(lambda: log.is_file() and "ready" in log.read_text())
        _wait_for(lambda: len(_descendants(pool.pid)) == 4)
        tree = _descendants(pool.pid)
        stray(tree)
        horses = [p for p in tree if os.getpgid(p) == p]
        assert len(horses) == 2  # out of the pool's group: killpg alone misses them
        getattr(children, how)(pool)
        assert not pool.alive()
        _wait_for(lambda: [p for p in tree if _running(p)] == [], timeout=5)


# --- the signal policy -------------------------------------------------------------------


def test_owners_install_no_signal_handler(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    settings = ServiceSettings(base_dir=tmp_path, env={}, install=False)
    with Children(), Services(settings):
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_deferred_sigterm_reaches_the_policy_after_the_block() -> None:
    before = signal.getsignal(signal.SIGTERM)
    finished = []
    with sigterm_interrupts():
        with pytest.raises(KeyboardInterrupt), signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # the handler has run by now, and only noted it
            finished.append(True)
        assert finished == [True]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) == before


def test_port_taken_sees_a_listener() -> None:
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert port_taken(listener.getsockname()[1])
    assert not port_taken(free_port())


# --- SIGTERM to `mailbench` --------------------------------------------------------------

_COMMAND = '''
"""A mailbench command that owns children: two, each with a child that ignores SIGTERM."""
import sys, time
from pathlib import Path
from harness.process import Children

GRANDCHILD = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
CHILD = (
    "import subprocess, sys, time; "
    f"subprocess.Popen([sys.executable, '-c', {GRANDCHILD!r}]); time.sleep(60)"
)

def add_cli_arguments(parser):
    parser.add_argument("logs", type=Path)

def cli_main(args):
    with Children() as children:
        for n in range(2):
            children.start(f"child-{n}", [sys.executable, "-c", CHILD], args.logs / f"{n}.log")
        time.sleep(60)
    return 0
'''


@pytest.mark.parametrize("owns_children", [True, False], ids=["policy", "no-policy-control"])
def test_sigterm_to_mailbench_leaves_no_child_alive(
    tmp_path: Path, owns_children: bool, stray: Callable[[Iterable[int]], None]
) -> None:
    (tmp_path / "children_cmd.py").write_text(_COMMAND)
    entry = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from harness import cli
        cli.COMMANDS["children"] = ("children_cmd", "start children and wait")
        if {owns_children}:
            cli.OWNS_CHILDREN |= {{"children"}}
        sys.exit(cli.main())
    """)
    harness = subprocess.Popen(
        [sys.executable, "-c", entry, "children", str(tmp_path / "logs")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        _wait_for(lambda: len(_descendants(harness.pid)) == 4)
        seen = _descendants(harness.pid)
        stray(seen)
        assert all(_running(p) for p in seen)
        harness.send_signal(signal.SIGTERM)
        _, stderr = harness.communicate(timeout=30)
    finally:
        if harness.poll() is None:
            harness.kill()
            harness.wait()
    if not owns_children:
        # Control: without the policy SIGTERM kills the harness outright, and the
        # grandchildren that ignore SIGTERM (no PDEATHSIG of theirs) outlive it.
        assert harness.returncode == -signal.SIGTERM
        time.sleep(0.5)
        assert any(_running(p) for p in seen)
        return
    assert harness.returncode == 130, stderr
    assert "mailbench children: interrupted" in stderr
    assert [p for p in seen if _running(p)] == []
