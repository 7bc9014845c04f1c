"""How the harness starts Locust: the warm-up it passes, and a master for workers of
other hosts (``--expect-workers``)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from harness.errors import ConfigError
from harness.run.cli import add_cli_arguments, config_from_args
from harness.run.config import RunConfig
from harness.run.locust import locust_argv, on_loopback

REMOTE = ("--target", "http://10.1.2.3:8080", "--expect-workers", "3", "--master-host",
          "10.1.2.1", "--master-port", "6557")  # fmt: skip


def config(*argv: str) -> RunConfig:
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def value(argv: list[str], option: str) -> str:
    return argv[argv.index(option) + 1]


def test_the_warm_up_reaches_locust() -> None:
    argv = locust_argv(config(), "http://127.0.0.1:1", Path("raw"), None, 20, warmup=3)
    assert value(argv, "--warmup") == "3"


def test_workers_of_other_hosts_join_a_master_on_the_given_address() -> None:
    cfg = config(*REMOTE)
    assert (cfg.expect_workers, cfg.master_host, cfg.master_port) == (3, "10.1.2.1", 6557)
    argv = locust_argv(cfg, "http://10.1.2.3:8080", Path("raw"), None, 20)
    assert "--master" in argv and "--processes" not in argv
    assert value(argv, "--expect-workers") == "3"
    assert (value(argv, "--master-bind-host"), value(argv, "--master-bind-port")) == (
        "10.1.2.1",
        "6557",
    )
    assert float(value(argv, "--expect-workers-max-wait")) > 0


def test_a_server_on_loopback_is_loaded_from_here() -> None:
    # The harness's own samples (the generator's floor, say) are on 127.0.0.1.
    argv = locust_argv(config(*REMOTE), "http://127.0.0.1:9999", Path("raw"), None, 20)
    assert "--master" not in argv and "--expect-workers" not in argv


@pytest.mark.parametrize(
    ("url", "loopback"),
    [("http://127.0.0.1:8080", True), ("http://[::1]:80/", True), ("http://localhost/", True),
     ("http://10.0.0.5:8080", False), ("http://app.internal:8080", False)],
)  # fmt: skip
def test_loopback(url: str, loopback: bool) -> None:
    assert on_loopback(url) is loopback


@pytest.mark.parametrize(
    "argv",
    [
        ("--expect-workers", "2"),  # mailbench's own servers: loopback only
        ("--expect-workers", "2", "--target", "http://127.0.0.1:8080"),
        ("--expect-workers", "2", "--target", "http://10.0.0.5:8080", "--locust-procs", "2"),
        ("--expect-workers", "-1", "--target", "http://10.0.0.5:8080"),
    ],
)
def test_remote_workers_refused_where_they_cannot_work(argv: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError, match="--expect-workers"):
        config(*argv)
