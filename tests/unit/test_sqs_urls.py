"""SQS queue URLs: a local endpoint (``sqs://``) or an AWS queue (``https://``), and the
one-sentence errors for URLs that cannot be used."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import ServiceUnavailable
from harness.services.brokers import SQS, ensure_installed
from harness.services.settings import ServiceSettings
from queues import open_queue
from queues.errors import ConfigError, UnknownBackend
from queues.sqs import DEFAULT_REGION, LOCAL_KEY, Settings, Target, parse_url


def test_a_local_url_names_the_endpoint_region_and_settings() -> None:
    target, settings = parse_url("sqs://127.0.0.1:28576/jobs?region=eu-west-1&visibility=10")
    assert target == Target("eu-west-1", "jobs", "http://127.0.0.1:28576", LOCAL_KEY)
    assert settings == Settings(visibility=10.0)


def test_a_local_url_without_a_queue_leaves_the_name_to_the_caller() -> None:
    target, settings = parse_url("sqs://localhost:4566")
    assert (target.queue, target.region, target.endpoint) == (
        None,
        DEFAULT_REGION,
        "http://localhost:4566",
    )
    assert settings == Settings()


def test_a_local_url_takes_its_key_from_the_user_info() -> None:
    target, _ = parse_url("sqs://AKID:s%2Fecret@127.0.0.1:9324/q.fifo")
    assert target.key == ("AKID", "s/ecret")
    assert target.queue == "q.fifo"


def test_an_aws_queue_url_uses_the_credentials_chain_and_its_region() -> None:
    url = "https://sqs.eu-central-1.amazonaws.com/123456789012/mail-jobs?poll=20"
    target, settings = parse_url(url)
    assert target == Target("eu-central-1", "mail-jobs", None, None)
    assert settings.poll == 20


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("sqs://127.0.0.1/jobs", "names no host and port"),
        ("sqs://127.0.0.1:x/jobs", "cannot be used"),
        ("sqs://127.0.0.1:1/a/b", "more than one queue name"),
        ("sqs://127.0.0.1:1/jobs?colour=red", "unknown parameters colour"),
        ("sqs://127.0.0.1:1/jobs?poll=30", "poll is at most 20 s"),
        ("sqs://127.0.0.1:1/jobs?visibility=0", "must be positive"),
        ("sqs://127.0.0.1:1/jobs?max_receives=many", "is not a number"),
        ("https://example.com/123/jobs", "is no SQS queue URL"),
        ("https://sqs.us-east-1.amazonaws.com/123456789012", "is no SQS queue URL"),
    ],
)
def test_a_url_that_cannot_be_used_is_one_sentence(url: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as caught:
        parse_url(url)
    assert "\n" not in str(caught.value)


async def test_an_unknown_scheme_still_lists_sqs() -> None:
    with pytest.raises(UnknownBackend, match="sqs://"):
        await open_queue("sq://127.0.0.1:1/jobs")


async def test_a_password_in_the_url_never_reaches_the_error() -> None:
    with pytest.raises(ConfigError) as caught:
        await open_queue("sqs://AKID:hunter2@127.0.0.1:1/a/b")
    assert "hunter2" not in str(caught.value)


def test_a_missing_moto_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(SQS, "installed", lambda self, settings: False)
    with pytest.raises(ServiceUnavailable) as caught:
        ensure_installed(SQS(), ServiceSettings(base_dir=tmp_path, install=True, env={}))
    message = str(caught.value)
    assert "pip install 'moto[server]'" in message and "SQS_URL" in message
    assert "apt-get" not in message
