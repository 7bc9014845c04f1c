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
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

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


# --- what the user configured is used, and nothing is started -------------------------


def test_urls_from_the_environment_start_nothing(tmp_path: Path) -> None:
    given = {
        "AMQP_URL": "amqp://bench:secret@broker.example:5672/",
        "REDIS_URL": "redis://cache.example:6379/3",
        "DATABASE_URL": "postgresql://bench@db.example:5432/bench",
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
        lines = up.stdout.splitlines()
        exports = dict(line.removeprefix("export ").split("=", 1) for line in lines)
        assert exports == {ENV_VARS[n]: state[n]["url"] for n in SERVICE_NAMES}
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
        assert capsys.readouterr().out.count(" running ") == 3
    finally:
        assert _cli("down", *options) == 0
    assert capsys.readouterr().out.count("stopped ") == 3
    assert [p for n in processes for p in processes[n] if _running(p)] == []
    assert not state_file.exists()
    assert _cli("status", *options) == 0
    assert capsys.readouterr().out.count(" stopped") == 3
