"""A child is ready only when its port answers with the token it was started with."""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.errors import ProcessFailed
from harness.process import Children, wait_ready
from servers.fakegun.admin import FakegunAdmin
from servers.identity import IDENTITY_VAR

SLEEPER = [sys.executable, "-c", "import time; time.sleep(30)"]


@pytest.fixture
def children() -> Iterator[Children]:
    with Children() as started:
        yield started


def test_every_child_gets_a_token_of_its_own_in_its_environment(
    children: Children, tmp_path: Path
) -> None:
    show = [sys.executable, "-c", f"import os; print(os.environ[{IDENTITY_VAR!r}])"]
    first = children.start("a", show, tmp_path / "a.log")
    second = children.start("b", show, tmp_path / "b.log")
    for child in (first, second):
        child.process.wait(10)
    assert (tmp_path / "a.log").read_text().strip() == first.identity
    assert (tmp_path / "b.log").read_text().strip() == second.identity
    assert first.identity != second.identity and len(first.identity) >= 16


def test_ready_once_the_port_answers_our_token(children: Children, tmp_path: Path) -> None:
    child = children.start("server", SLEEPER, tmp_path / "s.log")
    answers = iter([None, None, child.identity])
    wait_ready([child], lambda: next(answers), 1234, what_to_do="stop it")


def test_any_other_answer_is_a_taken_port(children: Children, tmp_path: Path) -> None:
    child = children.start("fakegun", SLEEPER, tmp_path / "f.log")
    for stranger in ("someone-else", ""):  # another token, or an answer without one
        with pytest.raises(ProcessFailed) as caught:
            wait_ready([child], lambda s=stranger: s, 1234, what_to_do="stop it, or use 0")  # type: ignore[misc]
        assert str(caught.value) == (
            "Port 1234 is taken by another process, not the fakegun mailbench just started; "
            "stop it, or use 0."
        )


def test_processes_sharing_a_port_are_each_heard_from(children: Children, tmp_path: Path) -> None:
    one = children.start("server 0", SLEEPER, tmp_path / "0.log")
    two = children.start("server 1", SLEEPER, tmp_path / "1.log")
    heard: list[str] = []
    turns = itertools.cycle([one.identity, one.identity, two.identity])

    def identify() -> str:
        heard.append(next(turns))
        return heard[-1]

    wait_ready([one, two], identify, 1234, what_to_do="stop it")
    assert heard == [one.identity, one.identity, two.identity]


def test_a_child_that_exits_is_its_log_not_a_wait(children: Children, tmp_path: Path) -> None:
    child = children.start("server", [sys.executable, "-c", "print('boom')"], tmp_path / "x.log")
    child.process.wait(10)
    with pytest.raises(ProcessFailed, match="exited with code 0"):
        wait_ready([child], lambda: None, 1, what_to_do="stop it", timeout=5)


def test_the_fake_on_port_0_writes_its_port_and_answers_its_token(
    children: Children, tmp_path: Path
) -> None:
    port_file = tmp_path / "fake.port"
    command = [sys.executable, "-m", "servers.fakegun.cli", "--port", "0"]
    command += ["--port-file", str(port_file), "--latency", "fixed:0"]
    child = children.start("fakegun", command, tmp_path / "fake.log")
    port = child.wait_port_file(port_file, timeout=20)
    assert port > 0
    fake = FakegunAdmin(f"http://127.0.0.1:{port}")
    wait_ready([child], fake.identity, port, what_to_do="stop it")
    assert fake.identity() == fake.stats()["identity"] == child.identity


def test_nothing_listening_is_no_identity_yet() -> None:
    assert FakegunAdmin("http://127.0.0.1:9").identity(timeout=0.5) is None


def test_an_http_answer_without_a_token_is_a_stranger(children: Children, tmp_path: Path) -> None:
    script = (
        "import http.server, sys\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(404); self.end_headers(); self.wfile.write(b'no')\n"
        "s = http.server.HTTPServer(('127.0.0.1', 0), H)\n"
        "print(s.server_address[1], flush=True)\n"
        "s.serve_forever()\n"
    )
    child = children.start("http", [sys.executable, "-c", script], tmp_path / "h.log")
    deadline = time.monotonic() + 10
    while not (tmp_path / "h.log").read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    port = int((tmp_path / "h.log").read_text().split()[0])
    assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 404
    assert FakegunAdmin(f"http://127.0.0.1:{port}").identity() == ""
    assert child.alive()
