"""The broker recipes of harness.services.brokers, without starting a broker: each gets a
per-run password that no command line shows, and its files stay its owner's."""

from __future__ import annotations

import argparse
import json
import os
import stat
from pathlib import Path

import pytest

from harness.services.brokers import Credentials, RabbitMQ, Redis
from harness.services.manager import ServiceStatus, add_service_arguments, settings_from_args
from harness.services.settings import ServiceSettings
from harness.services.state import ENV_FILE, STATE_FILE, write_state

PASSWORD = "Qx7-per-run-Password-0"
CREDENTIALS = Credentials("mailbench", PASSWORD)


def settings(tmp_path: Path, **changes: object) -> ServiceSettings:
    return ServiceSettings(base_dir=tmp_path, env={"PATH": "/usr/bin:/bin"}, **changes)  # type: ignore[arg-type]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def files_with(folder: Path, secret: str) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_redis_reads_its_password_from_a_private_config_file(tmp_path: Path) -> None:
    workdir = tmp_path / "redis"
    credentials = Credentials(Redis.login, PASSWORD)
    launch = Redis().prepare(settings(tmp_path), workdir, credentials)
    assert PASSWORD not in " ".join(launch.argv) and PASSWORD not in json.dumps(launch.env)
    holders = files_with(workdir, PASSWORD)
    assert holders and all(mode(p) == 0o600 for p in holders)
    assert mode(workdir) == 0o700 and mode(workdir / "data") == 0o700
    # `default` (as whom the AOF is replayed) is the one user, and it has a password.
    [user] = [line for line in holders[0].read_text().splitlines() if line.startswith("user ")]
    assert user.startswith("user default on resetpass >") and "nopass" not in user
    url = Redis().url(settings(tmp_path), credentials)
    assert url == f"redis://default:{PASSWORD}@127.0.0.1:28379/0"


def test_rabbitmq_gets_a_user_of_its_own_and_no_guest(tmp_path: Path) -> None:
    workdir = tmp_path / "rabbitmq"
    launch = RabbitMQ().prepare(settings(tmp_path), workdir, CREDENTIALS)
    assert PASSWORD not in " ".join(launch.argv) and PASSWORD not in json.dumps(launch.env)
    [config] = files_with(workdir, PASSWORD)
    assert mode(config) == 0o600 and mode(workdir) == 0o700
    assert "guest" not in config.read_text().replace("# ", "")
    url = RabbitMQ().url(settings(tmp_path), CREDENTIALS)
    assert url == f"amqp://mailbench:{PASSWORD}@127.0.0.1:28672/"


@pytest.mark.parametrize("choice", ["always", "everysec"])
def test_redis_fsync_is_a_choice(tmp_path: Path, choice: str) -> None:
    parser = argparse.ArgumentParser()
    add_service_arguments(parser)
    chosen = settings_from_args(parser.parse_args(["--redis-fsync", choice]))
    assert chosen.redis_fsync == choice
    argv = Redis().prepare(settings(tmp_path, redis_fsync=choice), tmp_path / "r", CREDENTIALS).argv
    assert argv[argv.index("--appendfsync") + 1] == choice


def test_an_unknown_fsync_policy_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_service_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--redis-fsync", "no"])
    assert "always" in capsys.readouterr().err


def test_credentials_last_as_long_as_the_brokers_data(tmp_path: Path) -> None:
    path = tmp_path / "redis" / "credentials.json"
    first = Credentials.kept_in(path, "mailbench")
    assert len(first.password) >= 20 and mode(path) == 0o600
    assert Credentials.kept_in(path, "mailbench") == first  # a restart on the same data
    path.unlink()
    assert Credentials.kept_in(path, "mailbench") != first  # fresh data, fresh password
    assert first.password not in repr(first)


def test_state_files_holding_urls_are_private(tmp_path: Path) -> None:
    url = f"redis://mailbench:{PASSWORD}@127.0.0.1:28379/0"
    write_state(tmp_path, {"redis": {"url": url, "pid": 1}})
    assert mode(tmp_path / STATE_FILE) == 0o600
    env_file = tmp_path / ENV_FILE
    assert mode(env_file) == 0o600 and f"export REDIS_URL={url}" in env_file.read_text()
    write_state(tmp_path, {})
    assert not (tmp_path / STATE_FILE).exists() and not env_file.exists()


def test_a_status_does_not_show_the_password_in_its_repr() -> None:
    status = ServiceStatus(
        "redis", "running", f"redis://mailbench:{PASSWORD}@h:1/0", (os.getpid(),)
    )
    assert PASSWORD not in repr(status)


def test_service_settings_keep_the_environment_out_of_their_repr(tmp_path: Path) -> None:
    given = ServiceSettings(base_dir=tmp_path, env={"REDIS_URL": f"redis://:{PASSWORD}@h/0"})
    assert PASSWORD not in repr(given)
