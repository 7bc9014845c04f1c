"""Fixtures shared by every test module.

Real brokers: one :class:`~harness.services.manager.Services` per test session, each broker
started the first time a test asks for its URL and stopped when the session ends. A
broker that cannot be had skips its tests with the reason, except in CI (``CI=true``),
where a silent skip would hide a broken setup: there the test fails.
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from harness.errors import ServiceUnavailable
from harness.process import port_taken
from harness.services.manager import Services
from harness.services.settings import ServiceSettings

# A suite started as a background job of a non-interactive shell (a CI step's `cmd &`)
# inherits SIGINT ignored, and so would every mailbench it starts, which would then
# rightly ignore the Ctrl-C the interrupt tests send it. Run them as from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# --- real brokers ---------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Distinct free ports, random so that concurrent test sessions do not collide.

    Drawn below the ephemeral range (32768+), where an outgoing connection could take
    the port between this check and the broker's bind.
    """
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(20000, 32000)
        if port not in ports and not port_taken(port):
            ports.append(port)
    return ports


@pytest.fixture(scope="session")
def make_service_settings(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[], ServiceSettings]:
    """Settings for a new, private set of brokers: own directory, own free ports."""

    def make() -> ServiceSettings:
        base = tmp_path_factory.mktemp("services")
        _let_postgres_in(base, tmp_path_factory.getbasetemp())
        amqp, dist, epmd, redis, postgres, sqs = free_ports(6)
        return ServiceSettings(
            base_dir=base,
            rabbitmq_port=amqp,
            rabbitmq_dist_port=dist,
            epmd_port=epmd,
            redis_port=redis,
            postgres_port=postgres,
            sqs_port=sqs,
            env=dict(os.environ),  # AMQP_URL, REDIS_URL, DATABASE_URL, SQS_URL are honoured
        )

    return make


@pytest.fixture(scope="session")
def services(make_service_settings: Callable[[], ServiceSettings]) -> Iterator[Services]:
    with Services(make_service_settings()) as running:
        yield running


@pytest.fixture(scope="session")
def rabbitmq_url(services: Services) -> str:
    return _start_or_skip(services, "rabbitmq")


@pytest.fixture(scope="session")
def redis_url(services: Services) -> str:
    return _start_or_skip(services, "redis")


@pytest.fixture(scope="session")
def postgres_url(services: Services) -> str:
    return _start_or_skip(services, "postgres")


@pytest.fixture(scope="session")
def sqs_url(services: Services) -> str:
    return _start_or_skip(services, "sqs")


@pytest.fixture(scope="session")
def service_unavailable() -> Callable[[str], NoReturn]:
    """What a test does when a broker cannot be had, for tests that start their own."""
    return _skip_or_fail


def _start_or_skip(services: Services, name: str) -> str:
    try:
        return services.start(name)
    except ServiceUnavailable as exc:
        _skip_or_fail(str(exc))


def _skip_or_fail(reason: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def _let_postgres_in(directory: Path, basetemp: Path) -> None:
    """PostgreSQL runs as the postgres user, who must be able to enter its data dir.

    pytest makes its temporary directories private (0700); grant search (not read)
    permission on the ones between the data dir and pytest's per-user root.
    """
    if os.geteuid() != 0:
        return  # then PostgreSQL runs as we do
    top = basetemp.parent if basetemp.parent.name.startswith("pytest-of-") else basetemp
    if top not in directory.parents:
        return  # not under pytest's directories: leave the permissions alone
    for step in [directory, *directory.parents]:
        step.chmod(step.stat().st_mode | 0o001)
        if step == top:
            break
