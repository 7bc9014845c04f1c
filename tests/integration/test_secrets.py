"""Secrets never leak and nothing listens beyond loopback, in a real ``mailbench run``.

The Mailgun API key is given only through ``MAILGUN_API_KEY``: the harness's children
inherit it, the fake Mailgun requires it and the server and worker send it. While the run
goes on, the test watches the harness's process tree through /proc: no command line
carries the key (``ps`` would show it to every user), and every listening TCP socket of
those processes is bound to 127.0.0.1. Afterwards every file of the results folder —
results, manifest, logs, raw data, the queue's database — is scanned for the key, its
HTTP Basic form and the servers' CSRF secret.

The brokers are mailbench's own (Redis, PostgreSQL, RabbitMQ), each with a password drawn
for the run: the harness hands the queue URL to servers and workers in their environment,
so neither the URL nor the password may appear on any command line, in the run's output,
or in the results folder.
"""

from __future__ import annotations

import base64
import os
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

import pytest

from harness.process import Pid
from harness.process import family as process_tree
from harness.results.folder import load_run
from harness.services.settings import ENV_VARS, ServiceSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

API_KEY = "key-Zq7uT3xW9sPrivate4b1e"
LISTEN = "0A"  # TCP state in /proc/net/tcp*


@dataclass
class Watched:
    """What the test saw of the harness's process tree while the run went on."""

    listeners: dict[tuple[str, int], str] = field(default_factory=dict)  # -> command
    command_lines: set[str] = field(default_factory=set)
    csrf_secrets: set[str] = field(default_factory=set)
    queue_urls: set[str] = field(default_factory=set)  # as children got them


def listening_sockets() -> dict[int, tuple[str, int]]:
    """Socket inode -> (address, port) of every TCP socket in LISTEN state."""
    sockets = {}
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        lines = Path(table).read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            if fields[3] != LISTEN:
                continue
            address, port = fields[1].split(":")
            # The address is printed as 32-bit words in host (little-endian) order.
            words = bytes.fromhex(address)
            raw = b"".join(
                struct.pack("<I", struct.unpack(">I", words[i : i + 4])[0])
                for i in range(0, len(words), 4)
            )
            sockets[int(fields[9])] = (socket.inet_ntop(family, raw), int(port, 16))
    return sockets


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:
        pass  # the process ended meanwhile
    return inodes


def look(root: int, seen: Watched) -> None:
    listening = listening_sockets()
    leader = Pid.of(root)
    for pid in [p.pid for p in process_tree(leader)] if leader else []:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        seen.command_lines.add(command)
        for variable in environ:
            if variable.startswith(b"MAILBENCH_SECRET="):
                seen.csrf_secrets.add(variable.split(b"=", 1)[1].decode())
            if variable.startswith(b"MAILBENCH_QUEUE_URL="):
                seen.queue_urls.add(variable.split(b"=", 1)[1].decode())
        for inode in socket_inodes(pid):
            if inode in listening:
                seen.listeners[listening[inode]] = command


def leaks(folder: Path, secrets: list[str]) -> list[tuple[Path, str]]:
    """(file, secret) for every file under ``folder`` holding one of ``secrets`` in any
    of its written forms: plain, HTTP Basic credentials, base64."""
    needles = {}
    for secret in secrets:
        needles[secret.encode()] = secret
        needles[base64.b64encode(f"api:{secret}".encode())] = f"api:{secret} (base64)"
        needles[base64.b64encode(secret.encode())] = f"{secret} (base64)"
        needles[base64.urlsafe_b64encode(secret.encode()).rstrip(b"=")] = f"{secret} (base64url)"
    found = []
    for directory, _, files in os.walk(folder):
        for name in files:
            path = Path(directory, name)
            data = path.read_bytes()
            found += [(path, shown) for needle, shown in needles.items() if needle in data]
    return found


def test_the_leak_scanner_finds_what_it_looks_for(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    basic = base64.b64encode(f"api:{API_KEY}".encode()).decode()
    (tmp_path / "logs" / "a.log").write_text(f"Authorization: Basic {basic}\n")
    (tmp_path / "clean.json").write_text('{"key": "nothing to see"}')
    assert leaks(tmp_path, [API_KEY]) == [(tmp_path / "logs" / "a.log", f"api:{API_KEY} (base64)")]


def test_the_socket_watch_tells_addresses_apart() -> None:
    # 127.0.0.2 is loopback too, but not the address the servers must bind.
    opened = []
    for family, address in ((socket.AF_INET, "127.0.0.2"), (socket.AF_INET6, "::1")):
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.bind((address, 0))
        except OSError:  # no IPv6 on this machine
            listener.close()
            continue
        listener.listen()
        opened.append(listener)
    try:
        seen = Watched()
        look(os.getpid(), seen)
        expected = {(s.getsockname()[0], s.getsockname()[1]) for s in opened}
        assert expected <= set(seen.listeners)
    finally:
        for listener in opened:
            listener.close()


BROKER_MODES = ("redis", "postgres", "rabbitmq")


def test_a_run_keeps_its_secrets_and_listens_on_loopback_only(
    tmp_path: Path,
    make_service_settings: Callable[[], ServiceSettings],
    service_unavailable: Callable[[str], NoReturn],
) -> None:
    out = tmp_path / "results"
    services = make_service_settings()
    env = {**os.environ, "MAILGUN_API_KEY": API_KEY, "CI": "true"}  # a missing broker fails
    for variable in (*ENV_VARS.values(), "MAILBENCH_SECRET", "MAILBENCH_QUEUE_URL"):
        env.pop(variable, None)  # brokers of our own; the harness makes a secret per run
    modes = ("direct", "sqlite", *BROKER_MODES)
    command = [sys.executable, "-m", "harness.cli", "run", "--modes", ",".join(modes)]
    command += ["--scenario", "sender", "--duration", "3", "--warmup", "1", "--users", "3"]
    command += ["--out", str(out), "--services-dir", str(services.base_dir)]
    for name in ("rabbitmq", "rabbitmq_dist", "epmd", "redis", "postgres"):
        command += ["--port", f"{name}={getattr(services, f'{name}_port')}"]
    seen = Watched()
    with (tmp_path / "run.log").open("w+") as log:
        run = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 270
            while run.poll() is None and time.monotonic() < deadline:
                look(run.pid, seen)
                time.sleep(0.2)
        finally:
            if run.poll() is None:
                run.kill()
            run.wait(10)
        log.seek(0)
        output = log.read()
    if run.returncode != 0 and "is not installed" in output:
        service_unavailable(output.strip().splitlines()[-1])
    assert run.returncode == 0, output

    # The key worked: every accepted send was delivered to the fake, which demands it.
    [run_dir] = [p for p in out.iterdir() if p.is_dir() and not p.is_symlink()]
    results = load_run(run_dir)
    for mode in modes:
        counts = results.accounting_of(mode)
        assert counts is not None and counts.accepted > 0, results.accounting
        assert counts.delivered == counts.accepted, results.accounting

    # Never on a command line, where ps shows it.
    assert any("fakegun" in c for c in seen.command_lines), seen.command_lines
    assert not [c for c in seen.command_lines if API_KEY in c]

    # The fake, each mode's server, and nothing bound beyond loopback.
    commands = " ".join(seen.listeners.values())
    assert "fakegun" in commands and "serve" in commands, seen.listeners
    assert len(seen.listeners) >= 3, seen.listeners  # fake + one server per mode
    wide = {where: cmd for where, cmd in seen.listeners.items() if where[0] != "127.0.0.1"}
    assert wide == {}

    # Nothing in the results folder: results, manifest, logs, raw data, the queue.
    assert seen.csrf_secrets, "the servers were started without a shared CSRF secret"
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {"manifest.json", "summary.csv", "accounting.csv"} <= {p.name for p in files}
    assert any(p.suffix == ".log" for p in files) and any("raw" in p.parts for p in files)
    assert leaks(out, [API_KEY, *seen.csrf_secrets]) == []
    assert API_KEY not in output

    # Each broker had a password of the run's own, given to its clients in the
    # environment, and seen on no command line, in no output and in no results file.
    passwords = {urlsplit(url).scheme: urlsplit(url).password for url in seen.queue_urls}
    assert {"redis", "postgresql", "amqp"} <= set(passwords), seen.queue_urls
    secrets = [p for p in passwords.values() if p]
    assert len(secrets) >= 3 and "guest" not in secrets, passwords
    assert not [c for c in seen.command_lines if any(p in c for p in secrets)]
    assert not [p for p in secrets if p in output]
    assert leaks(out, secrets) == []
    # The brokers' own logs hold none either; only their 0600 config files do.
    broker_logs = [p for p in services.base_dir.rglob("*") if p.is_file() and ".log" in p.name]
    assert (
        broker_logs
        and [p for p in broker_logs if any(s.encode() in p.read_bytes() for s in secrets)] == []
    )
    credentials = list(services.base_dir.glob("*/credentials.json"))
    assert len(credentials) == 3 and all(
        stat.S_IMODE(p.stat().st_mode) == 0o600 for p in credentials
    )
