"""Real brokers from harness.services.manager: they start, answer, and leave no process behind.

Which processes a broker has is worked out here independently of harness.services.manager
(parent links and environments in /proc), so a bookkeeping bug there cannot hide a leak.
A zombie counts as gone: PID 1 reaps orphans slowly on these machines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import pytest
import redis
from pamqp.commands import Basic

from harness.errors import ServiceUnavailable
from harness.services.manager import Services, add_cli_arguments, cli_main
from harness.services.settings import ENV_VARS, SERVICE_NAMES, ServiceSettings
from harness.services.state import urls_from_state

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


# --- /proc, read independently of the code under test -----------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def _running(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _tree(root: int) -> set[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            parents[int(entry)] = int(stat[1])
    found, todo = {root}, [root]
    while todo:
        parent = todo.pop()
        kids = {pid for pid, ppid in parents.items() if ppid == parent}
        todo.extend(kids - found)
        found |= kids
    return found


def _with_env(pair: str) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if pair.encode() in env:
            found.add(int(entry))
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _processes(name: str, leader: int, settings: ServiceSettings) -> set[int]:
    """Every running process of one broker: its tree, plus epmd for RabbitMQ."""
    found = _tree(leader)
    if name == "rabbitmq":  # epmd double-forks away from the tree
        found |= _with_env(f"ERL_EPMD_PORT={settings.epmd_port}")
    return {pid for pid in found if _running(pid)}


def _no_url_vars(settings: ServiceSettings) -> ServiceSettings:
    """These tests are about our own processes: ignore brokers named in the environment."""
    env = {k: v for k, v in settings.env.items() if k not in ENV_VARS.values()}
    return dataclasses.replace(settings, env=env)


def _start(services: Services, name: str, unavailable: Callable[[str], NoReturn]) -> str:
    try:
        return services.start(name)
    except ServiceUnavailable as exc:
        unavailable(str(exc))


# --- each broker answers a real command ----------------------------------------------------


def test_redis_answers_and_keeps_an_append_only_file(redis_url: str, services: Services) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.ping() is True
        key = f"mailbench:test:{uuid.uuid4().hex}"
        assert client.lpush(key, "job-1", "job-2") == 2
        assert client.lrange(key, 0, -1) == [b"job-2", b"job-1"]
        client.delete(key)
        if services.status()["redis"].state == "running":  # ours, not a REDIS_URL server
            assert client.config_get("appendonly") == {"appendonly": "yes"}
    finally:
        client.close()


async def test_rabbitmq_confirms_a_persistent_message(rabbitmq_url: str) -> None:
    connection = await aio_pika.connect(rabbitmq_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(f"mailbench.test.{uuid.uuid4().hex}", durable=True)
        confirmation = await channel.default_exchange.publish(
            aio_pika.Message(b"hello", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=queue.name,
        )
        assert isinstance(confirmation, Basic.Ack)
        message = await queue.get(timeout=5)
        assert message is not None and message.body == b"hello"
        await message.ack()
        await queue.delete()


async def test_postgres_answers_in_the_mailbench_database(
    postgres_url: str, services: Services
) -> None:
    connection = await asyncpg.connect(postgres_url)
    try:
        assert await connection.fetchval("SELECT 1") == 1
        if services.status()["postgres"].state == "running":
            assert await connection.fetchval("SELECT current_database()") == "mailbench"
            assert await connection.fetchval("SHOW fsync") == "on"
    finally:
        await connection.close()


# --- only clients with the run's credentials get in ----------------------------------------


def _ours(services: Services, name: str) -> None:
    if services.status()[name].state != "running":
        pytest.skip(f"{name} is a server of the user's ({ENV_VARS[name]}): its access is theirs")


def test_redis_refuses_a_client_without_the_password(redis_url: str, services: Services) -> None:
    _ours(services, "redis")
    parts = urlsplit(redis_url)
    assert parts.password
    for password in (None, "guess"):
        client = redis.Redis(host="127.0.0.1", port=parts.port, password=password)
        with client, pytest.raises(redis.AuthenticationError):
            client.ping()


async def test_rabbitmq_refuses_guest(rabbitmq_url: str, services: Services) -> None:
    _ours(services, "rabbitmq")
    parts = urlsplit(rabbitmq_url)
    assert parts.password and parts.username != "guest"
    with pytest.raises(aio_pika.exceptions.ProbableAuthenticationError):
        await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:{parts.port}/", timeout=10)


async def test_postgres_refuses_a_client_without_the_password(
    postgres_url: str, services: Services
) -> None:
    _ours(services, "postgres")
    parts = urlsplit(postgres_url)
    assert parts.password
    socket_dir = services.settings.base_dir / "postgres" / "data"
    hosts = ["127.0.0.1"] + ([str(socket_dir)] if len(str(socket_dir)) < 90 else [])
    for host in hosts:  # TCP, and the Unix socket (pg_hba's `local` lines)
        for password in ("", "guess"):
            with pytest.raises(asyncpg.InvalidPasswordError):
                await asyncpg.connect(
                    host=host,
                    port=parts.port,
                    user=parts.username,
                    password=password,
                    database="mailbench",
                    timeout=10,
                )


@pytest.mark.parametrize("name", ["redis", "postgres"])
async def test_a_restarted_broker_keeps_its_credentials(
    name: str,
    make_service_settings: Callable[[], ServiceSettings],
    service_unavailable: Callable[[str], NoReturn],
) -> None:
    # What `mailbench chaos` does: a crash, then a start on the same data.
    with Services(_no_url_vars(make_service_settings())) as services:
        url = _start(services, name, service_unavailable)
        assert services.restart(name) == url
        if name == "redis":
            with redis.Redis.from_url(url) as client:
                assert client.ping() is True
        else:
            connection = await asyncpg.connect(url)
            await connection.close()


def _open_to_others(path: Path, top: Path) -> bool:
    """Whether a user other than the owner can read ``path`` (a file) or list it (a
    directory), every directory from ``top`` down being theirs to enter."""
    steps = [path, *path.parents]
    chain = steps[: steps.index(top) + 1]
    for step in chain[1:]:
        if not step.stat().st_mode & (stat.S_IXGRP | stat.S_IXOTH):
            return False
    return bool(path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH))


def test_the_brokers_files_are_their_owners(
    redis_url: str, postgres_url: str, rabbitmq_url: str, services: Services
) -> None:
    base = services.settings.base_dir
    ours = [n for n in SERVICE_NAMES if services.status()[n].state == "running"]
    if not ours:
        pytest.skip("every broker is a server of the user's")
    for name in ours:
        workdir = base / name
        opened = [p for p in [workdir, *workdir.rglob("*")] if _open_to_others(p, base)]
        assert opened == [], f"{name}: {opened[:5]}"
        if name == "sqs":  # moto checks no credentials (docs/modes.md): nothing to hold
            continue
        password = urlsplit(services.status()[name].url or "").password
        assert password
        holders = [
            p for p in workdir.rglob("*") if p.is_file() and password.encode() in p.read_bytes()
        ]
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in holders), holders


# --- what the user configured is used, and nothing is started -------------------------


def test_urls_from_the_environment_start_nothing(tmp_path: Path) -> None:
    given = {
        "AMQP_URL": "amqp://bench:secret@broker.example:5672/",
        "REDIS_URL": "redis://cache.example:6379/3",
        "DATABASE_URL": "postgresql://bench@db.example:5432/bench",
        "SQS_URL": "https://sqs.eu-west-1.amazonaws.com/123456789012/mailbench",
    }
    settings = ServiceSettings(base_dir=tmp_path / "services", env=given, install=False)
    before = _tree(os.getpid())
    with Services(settings) as services:
        for name in SERVICE_NAMES:
            assert services.start(name) == given[ENV_VARS[name]]
        states = services.status()
        assert {s.state for s in states.values()} == {"external"}
        assert all(s.pids == () for s in states.values())
        assert _tree(os.getpid()) == before
    assert not (tmp_path / "services").exists()


def test_a_missing_broker_says_how_to_get_one(tmp_path: Path) -> None:
    settings = ServiceSettings(base_dir=tmp_path, env={"PATH": str(tmp_path)}, install=False)
    with Services(settings) as services, pytest.raises(ServiceUnavailable) as caught:
        services.start("redis")
    assert str(caught.value) == (
        "Redis is not installed: run `apt-get install redis-server`, or set REDIS_URL to an "
        "existing server, or `docker compose up -d redis`."
    )


def test_a_taken_sqs_port_is_one_sentence_and_starts_nothing(
    make_service_settings: Callable[[], ServiceSettings],
) -> None:
    settings = _no_url_vars(make_service_settings())
    before = _tree(os.getpid())
    with socket.socket() as holder, Services(settings) as services:
        holder.bind(("127.0.0.1", settings.sqs_port))
        holder.listen()
        with pytest.raises(ServiceUnavailable) as caught:
            services.start("sqs")
        assert _tree(os.getpid()) == before
    message = str(caught.value)
    assert message.startswith(f"SQS (moto) cannot start: port {settings.sqs_port} on 127.0.0.1")
    assert "SQS_URL" in message and "\n" not in message


# --- nothing outlives stop(), the context, a signal, or `services down` -------------------


def test_stop_and_exit_leave_no_process(
    make_service_settings: Callable[[], ServiceSettings],
    service_unavailable: Callable[[str], NoReturn],
) -> None:
    settings = _no_url_vars(make_service_settings())
    with Services(settings) as services:
        processes = {}
        for name in SERVICE_NAMES:
            _start(services, name, service_unavailable)
            status = services.status()[name]
            assert status.state == "running"
            processes[name] = _processes(name, status.pids[0], settings)
            assert processes[name] <= set(status.pids)  # it knows all of them
        assert "beam.smp" in {_comm(p) for p in processes["rabbitmq"]}
        assert "epmd" in {_comm(p) for p in processes["rabbitmq"]}
        assert len(processes["postgres"]) > 1  # postmaster and its workers

        services.stop("redis")
        assert not [p for p in processes["redis"] if _running(p)]
        assert services.status()["redis"].state == "stopped"
        assert all(_running(p) for p in processes["postgres"] | processes["rabbitmq"])
    leftover = [p for name in SERVICE_NAMES for p in processes[name] if _running(p)]
    assert leftover == []


_HOLDER = """
import json, sys, time
from pathlib import Path
from harness.errors import ServiceUnavailable
from harness.process import sigterm_interrupts
from harness.services.manager import Services
from harness.services.settings import ServiceSettings

config = json.loads(sys.argv[1])
settings = ServiceSettings(
    base_dir=Path(config["base_dir"]), redis_port=config["redis_port"],
    postgres_port=config["postgres_port"], env={"PATH": config["path"]},
)
# The entry point's signal policy, as `mailbench` sets it: SIGTERM unwinds like Ctrl-C.
with sigterm_interrupts(), Services(settings) as services:
    try:
        services.start("redis")
        services.start("postgres")
    except ServiceUnavailable as exc:
        print(json.dumps({"unavailable": str(exc)}), flush=True)
        sys.exit(3)
    print(json.dumps({n: s.pids for n, s in services.status().items() if s.pids}), flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_to_the_owner_stops_its_brokers(
    sig: signal.Signals,
    make_service_settings: Callable[[], ServiceSettings],
    service_unavailable: Callable[[str], NoReturn],
) -> None:
    settings = make_service_settings()
    config = {
        "base_dir": str(settings.base_dir),
        "redis_port": settings.redis_port,
        "postgres_port": settings.postgres_port,
        "path": os.environ.get("PATH", ""),
    }
    owner = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, json.dumps(config)],
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        assert owner.stdout is not None
        report = json.loads(owner.stdout.readline() or "{}")
        if "unavailable" in report:
            service_unavailable(report["unavailable"])
        processes = {p for pid in (report["redis"][0], report["postgres"][0]) for p in _tree(pid)}
        assert all(_running(p) for p in processes) and len(processes) > 2
        owner.send_signal(sig)
        code = owner.wait(timeout=30)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
    # Either signal ends it through KeyboardInterrupt (Python then exits by SIGINT), after
    # the cleanup; had SIGTERM killed it outright, the code would be -SIGTERM.
    assert code == -signal.SIGINT
    assert [p for p in processes if _running(p)] == []


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    return cli_main(parser.parse_args(argv))


def test_services_up_outlives_the_command_and_down_stops_everything(
    make_service_settings: Callable[[], ServiceSettings],
    service_unavailable: Callable[[str], NoReturn],
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = _no_url_vars(make_service_settings())
    base = settings.base_dir
    options = ["--dir", str(base)]
    for key, port in [
        ("rabbitmq", settings.rabbitmq_port),
        ("rabbitmq_dist", settings.rabbitmq_dist_port),
        ("epmd", settings.epmd_port),
        ("redis", settings.redis_port),
        ("postgres", settings.postgres_port),
    ]:
        options += ["--port", f"{key}={port}"]
    cli = (
        "import argparse, sys\n"
        "from harness.services.manager import add_cli_arguments, cli_main\n"
        "parser = argparse.ArgumentParser()\n"
        "add_cli_arguments(parser)\n"
        "sys.exit(cli_main(parser.parse_args()))\n"
    )
    # `up` runs as its own process, which exits: the brokers must survive it.
    up = subprocess.run(
        [sys.executable, "-c", cli, "up", *options],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(settings.env),
        timeout=100,
    )
    state_file = base / "state.json"
    state = json.loads(state_file.read_text())["services"] if state_file.exists() else {}
    processes = {n: _processes(n, e["pid"], settings) for n, e in state.items()}
    try:
        if up.returncode == 1:  # one sentence per broker it could not start
            service_unavailable(up.stderr.strip().splitlines()[-1])
        assert up.returncode == 0, up.stderr
        # The URLs carry the brokers' passwords: in a file only the user reads, which the
        # output names, and never in the output itself (a CI log, a shared screen).
        env_file = base / "env"
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        assert str(env_file) in up.stdout
        lines = env_file.read_text().splitlines()
        pairs = (line.removeprefix("export ").split("=", 1) for line in lines)
        exports = {key: shlex.split(value)[0] for key, value in pairs}  # shell-quoted
        assert exports == {ENV_VARS[n]: state[n]["url"] for n in SERVICE_NAMES}
        # moto checks no credentials (docs/modes.md): SQS_URL carries no password.
        passwords = [urlsplit(u).password for k, u in exports.items() if k != ENV_VARS["sqs"]]
        assert all(passwords) and not [p for p in passwords if p and p in up.stdout + up.stderr]
        assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
        assert urls_from_state(base) == {n: state[n]["url"] for n in SERVICE_NAMES}
        assert all(processes[n] and all(_running(p) for p in processes[n]) for n in processes)
        with redis.Redis.from_url(exports["REDIS_URL"]) as client:
            assert client.ping() is True

        # Another Services on the same directory reuses them and leaves them running.
        with Services(dataclasses.replace(settings, install=False)) as services:
            assert services.start("redis") == exports["REDIS_URL"]
            assert services.status()["redis"].state == "external"
        assert all(_running(p) for p in processes["redis"])

        capsys.readouterr()
        assert _cli("status", *options) == 0
        shown = capsys.readouterr().out
        assert shown.count(" running ") == len(SERVICE_NAMES) and str(env_file) in shown
        assert not [p for p in passwords if p and p in shown]
    finally:
        assert _cli("down", *options) == 0
    assert capsys.readouterr().out.count("stopped ") == len(SERVICE_NAMES)
    assert [p for n in processes for p in processes[n] if _running(p)] == []
    assert not state_file.exists() and not (base / "env").exists()
    assert _cli("status", *options) == 0
    assert capsys.readouterr().out.count(" stopped") == len(SERVICE_NAMES)


def test_a_crashed_redis_keeps_what_its_transactions_did(
    make_service_settings: Callable[[], ServiceSettings],
    service_unavailable: Callable[[str], NoReturn],
) -> None:
    # The queue settles, retries and hands back in MULTI/EXEC. Replaying the AOF after a
    # crash must apply them: Redis 7.0-7.4 drop every replayed transaction with NOPERM
    # when the `default` user (as whom the AOF is replayed) is switched off.
    with Services(_no_url_vars(make_service_settings())) as services:
        url = _start(services, "redis", service_unavailable)
        with redis.Redis.from_url(url) as client:
            client.set("plain", 1)
            with client.pipeline(transaction=True) as pipe:
                pipe.set("in-a-transaction", 1).xadd("stream", {"job": "x"}).execute()
        services.restart("redis")
        with redis.Redis.from_url(url) as client:
            assert client.get("plain") == b"1"
            assert client.get("in-a-transaction") == b"1"
            assert client.xlen("stream") == 1
