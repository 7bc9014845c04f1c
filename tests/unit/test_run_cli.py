"""`mailbench run` options → RunConfig: tiers, CPUs, targets, and clear refusals."""

from __future__ import annotations

import argparse
import os

import pytest

from harness.errors import ConfigError
from harness.run.cli import add_cli_arguments, config_from_args, parse_cpus, parse_nice
from harness.run.config import RunConfig


def config(*argv: str) -> RunConfig:
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_defaults_are_one_process_per_tier_and_no_render() -> None:
    cfg = config()
    assert (cfg.server_procs, cfg.worker_procs, cfg.locust_processes) == (1, 1, 0)
    assert cfg.render_ms == 0 and cfg.cpus == () and cfg.target is None


def test_tiers_render_and_locust_processes() -> None:
    cfg = config("--server-procs", "2", "--worker-procs", "3", "--locust-procs", "2",
                 "--concurrency", "40", "--render-ms", "20")  # fmt: skip
    assert (cfg.server_procs, cfg.worker_procs, cfg.locust_processes) == (2, 3, 2)
    assert (cfg.worker_concurrency, cfg.render_ms) == (40, 20)
    assert config("--locust-processes", "4").locust_processes == 4  # the older spelling


@pytest.mark.parametrize(
    "argv",
    [("--server-procs", "0"), ("--worker-procs", "0"), ("--render-ms", "-1"),
     ("--concurrency", "0"), ("--modes", "direct,nope")],
)  # fmt: skip
def test_bad_tier_options_are_refused(argv: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError):
        config(*argv)


def test_cpus_pin_tiers_to_available_cpus() -> None:
    cpu = min(os.sched_getaffinity(0))
    assert parse_cpus([f"server={cpu}", f"worker={cpu},{cpu}"]) == (
        ("server", (cpu,)),
        ("worker", (cpu,)),
    )
    assert config("--cpus", f"locust={cpu}").cpus_of("locust") == (cpu,)
    assert config().cpus_of("server") is None


@pytest.mark.parametrize("spec", ["server", "web=0", "server=x", "server=100000"])
def test_bad_cpus_are_refused_in_one_sentence(spec: str) -> None:
    with pytest.raises(ConfigError, match="--cpus"):
        parse_cpus([spec])


def test_target_replaces_the_modes_and_carries_its_contract() -> None:
    cfg = config("--target", "http://127.0.0.1:9000", "--target-name", "dream",
                 "--send-path", "/mail", "--fields", "email,title,body",
                 "--fakegun-port", "9025")  # fmt: skip
    assert cfg.modes == ("dream",)
    assert cfg.target is not None
    assert cfg.target.locust_options() == [
        "--form-path", "/", "--send-path", "/mail", "--field-to", "email",
        "--field-subject", "title", "--field-message", "body",
    ]  # fmt: skip
    assert cfg.describe()["target"]["fakegun"] == "started on port 9025"


@pytest.mark.parametrize(
    "argv",
    [("--target", "ftp://x"), ("--target", "http://x", "--send-path", "send"),
     ("--target", "http://x", "--fields", "to,subject"),
     ("--target", "http://x", "--target-name", "a b")],
)  # fmt: skip
def test_bad_targets_are_refused(argv: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError):
        config(*argv)


def test_nice_lowers_a_tiers_priority() -> None:
    assert parse_nice(["worker=10", "locust=0"]) == (("worker", 10), ("locust", 0))
    assert config("--nice", "worker=19").describe()["nice"] == {"worker": 19}


@pytest.mark.parametrize("spec", ["worker", "worker=-5", "worker=20", "db=3", "worker=x"])
def test_bad_nice_is_refused_in_one_sentence(spec: str) -> None:
    with pytest.raises(ConfigError, match="--nice"):
        parse_nice([spec])
