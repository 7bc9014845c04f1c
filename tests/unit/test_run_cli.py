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


def test_the_fake_the_run_starts_takes_faults_a_rate_limit_and_idempotency() -> None:
    assert config().fake_options == ()
    cfg = config("--target", "http://127.0.0.1:9000", "--api-faults", "503:0.2, reset:0.1",
                 "--rate-limit", "5:2", "--idempotency")  # fmt: skip
    assert cfg.fake_options == (
        "--fault", "503:0.2", "--fault", "reset:0.1", "--rate-limit", "5:2", "--idempotency",
    )  # fmt: skip
    assert config("--modes", "direct", "--api-faults", "500:0.1").fake_options[1] == "500:0.1"


@pytest.mark.parametrize(
    ("argv", "says"),
    [(("--api-faults", "teapot:0.1"), "Fault 'teapot:0.1' is not understood"),
     (("--api-faults", "500:0.6,503:0.6"), "add up to 1.2"),
     (("--rate-limit", "fast"), "Rate limit 'fast' is not understood"),
     (("--target", "http://x", "--fakegun-url", "http://127.0.0.1:8025",
       "--api-faults", "503:0.1"), "the one at --fakegun-url keeps its own")],
)  # fmt: skip
def test_bad_faults_are_refused_before_anything_starts(argv: tuple[str, ...], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        config(*argv)


def test_a_target_with_commands_sends_to_a_fake_on_any_free_port() -> None:
    cfg = config("--target", "http://127.0.0.1:9000", "--server-cmd", "app --port 9000",
                 "--worker-cmd", "app-worker --url '$MAILBENCH_MAILGUN_URL'")  # fmt: skip
    assert cfg.target is not None
    assert cfg.target.server_cmd == ("app", "--port", "9000")
    assert cfg.target.worker_cmd == ("app-worker", "--url", "$MAILBENCH_MAILGUN_URL")
    assert cfg.target.fakegun_port == 0  # the commands are told where it is
    plain = config("--target", "http://127.0.0.1:9000").target
    assert plain is not None and plain.fakegun_port == 8025  # where an app sends by default
