"""Queue URLs, which may carry a broker's password, reach servers and workers through the
environment: ``ps`` shows every command line to every user of the machine."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import pytest

from harness import cli
from harness.run.config import RunConfig
from harness.run.tiers import Tiers, TierStarter
from servers import worker
from servers.mailgun import MailgunSettings
from servers.modes import mode
from servers.queue_url import QUEUE_URL_VAR
from servers.web import app as server_app
from servers.web.app import ServerSettings

PASSWORD = "Zr4-private-9q"
URL = f"redis://mailbench:{PASSWORD}@127.0.0.1:28379/0"


def server_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    server_app.add_cli_arguments(parser)
    return parser.parse_args(argv)


def worker_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    worker.add_cli_arguments(parser)
    return parser.parse_args(argv)


def test_the_server_reads_its_queue_url_from_the_environment() -> None:
    settings = server_app.settings_from_args(server_args("--mode", "redis"), {QUEUE_URL_VAR: URL})
    assert settings.queue_url == URL


def test_the_worker_reads_its_queue_url_from_the_environment() -> None:
    settings = worker.settings_from_args(worker_args(), {QUEUE_URL_VAR: URL})
    assert settings.backend == URL


def test_an_option_still_wins_over_the_environment() -> None:
    environ = {QUEUE_URL_VAR: "redis://127.0.0.1:1/0"}
    args = server_args("--mode", "sqlite", "--queue-url", "memory://")
    assert server_app.settings_from_args(args, environ).queue_url == "memory://"
    assert worker.settings_from_args(worker_args("--backend", "memory://"), environ).backend == (
        "memory://"
    )


def test_a_password_on_the_command_line_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        worker.settings_from_args(worker_args("--backend", URL), {})
        server_app.settings_from_args(server_args("--mode", "redis", "--queue-url", URL), {})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert all(QUEUE_URL_VAR in w and "ps" in w for w in warnings), warnings
    assert not any(PASSWORD in w for w in warnings)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        worker.settings_from_args(worker_args("--backend", "memory://"), {})
    assert not caplog.records


def test_a_worker_without_a_queue_url_says_how_to_give_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(QUEUE_URL_VAR, raising=False)
    assert cli.main(["worker"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and QUEUE_URL_VAR in err and "--backend" in err


def test_settings_keep_secrets_out_of_their_repr() -> None:
    settings = ServerSettings(
        mode="redis", queue_url=URL, mailgun=MailgunSettings(api_key="key-Secret1234")
    )
    assert PASSWORD not in repr(settings) and "key-Secret1234" not in repr(settings)
    assert "key-Secret1234" not in repr(MailgunSettings(api_key="key-Secret1234"))


class FakeChildren:
    """Stands in for harness.process.Children: records what would be started."""

    def __init__(self) -> None:
        self.started: list[tuple[list[str], dict[str, str]]] = []

    def start(
        self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None
    ) -> Any:
        self.started.append((list(argv), dict(env or {})))
        return object()


def test_the_harness_hands_queue_urls_over_in_the_environment(tmp_path: Path) -> None:
    children = FakeChildren()
    starter = TierStarter(RunConfig(out=tmp_path), children, "http://127.0.0.1:1", "secret")  # type: ignore[arg-type]
    tiers = Tiers(mode("redis"), "redis", tmp_path, "http://127.0.0.1:2", 2, URL, "q")
    starter.start_server(tiers)
    starter.start_worker(tiers)
    assert len(children.started) == 2
    for argv, env in children.started:
        assert not [a for a in argv if PASSWORD in a], argv
        assert env[QUEUE_URL_VAR] == URL
