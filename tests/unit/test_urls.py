"""Queue URLs: mailbench's settings split off the query, and the one redaction every log,
stdout line and error message uses. A wrong or unreachable broker URL fails with one of
mailbench's errors, and nothing it prints or chains carries the password."""

from __future__ import annotations

import asyncio
import traceback
from urllib.parse import urlsplit

import pytest

from queues import open_queue
from queues.errors import ConfigError, MailbenchError, ServiceUnavailable, UnknownBackend
from queues.postgres import PostgresSettings
from queues.redis import Settings as RedisSettings
from queues.sql import Settings as SQLSettings
from queues.urls import redact_url, split_settings

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://guest:secret@127.0.0.1:5673/", "amqp://guest:***@127.0.0.1:5673/"),
        (
            "amqps://bench:p@ss@broker.example:5671/vhost",
            "amqps://bench:***@broker.example:5671/vhost",
        ),
        ("redis://bench:a:b:c@cache:6379/0", "redis://bench:***@cache:6379/0"),
        ("redis://:secret@localhost:6380/0", "redis://:***@localhost:6380/0"),
        ("postgresql://bench:p%40ss%3Aw@db:5432/bench", "postgresql://bench:***@db:5432/bench"),
        ("postgresql://bench:pw@[::1]:5433/db", "postgresql://bench:***@[::1]:5433/db"),
        (
            "postgresql://bench:pw@db:5432/bench?sslmode=require&lease=5#x",
            "postgresql://bench:***@db:5432/bench?sslmode=require&lease=5#x",
        ),
        (
            "postgres://bench@db/bench?sslmode=require&password=s3cret&pool=4",
            "postgres://bench@db/bench?sslmode=require&password=***&pool=4",
        ),
        ("rediss://cache:6380/0?ssl_cert_reqs=none", "rediss://cache:6380/0?ssl_cert_reqs=none"),
        ("postgresql://bench@db:5432/bench", "postgresql://bench@db:5432/bench"),
        ("postgresql:///bench?host=/run/postgresql", "postgresql:///bench?host=/run/postgresql"),
        ("redis://bench:@cache/0", "redis://bench:@cache/0"),
        ("redis://[::1]:6379/0", "redis://[::1]:6379/0"),
        ("sqlite:///data/jobs.db?lease=5", "sqlite:///data/jobs.db?lease=5"),
        ("sqlite:////var/lib/mailbench/jobs.db", "sqlite:////var/lib/mailbench/jobs.db"),
        ("memory://", "memory://"),
        ("memory://space", "memory://space"),
        ("localhost:6379", "localhost:6379"),
    ],
)
def test_redact_url_hides_only_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    before, after = urlsplit(url), urlsplit(shown)
    assert (after.scheme, after.hostname, after.port, after.username, after.path) == (
        before.scheme,
        before.hostname,
        before.port,
        before.username,
        before.path,
    )
    assert after.password in (None, "", "***")


def test_split_settings_takes_its_fields_and_leaves_the_drivers() -> None:
    dsn, settings = split_settings(
        "postgresql://bench:pw@db:5432/bench?lease=5&sslmode=require&pool=3", PostgresSettings()
    )
    assert dsn == "postgresql://bench:pw@db:5432/bench?sslmode=require"
    assert settings == PostgresSettings(lease=5.0, pool=3)
    assert isinstance(settings.pool, int)

    url, redis = split_settings(
        "redis://cache:6379/0?visibility=1.5&max_connections=8", RedisSettings(), "Redis"
    )
    assert url == "redis://cache:6379/0?max_connections=8"
    assert redis == RedisSettings(visibility=1.5)

    assert split_settings("redis://cache/0", RedisSettings()) == (
        "redis://cache/0",
        RedisSettings(),
    )


@pytest.mark.parametrize(
    ("url", "kept"),
    [
        ("sqlite:////var/lib/jobs.db?lease=5", "sqlite:////var/lib/jobs.db"),
        ("sqlite:///jobs.db?poll=0.5", "sqlite:///jobs.db"),
        (
            "postgresql:///bench?host=/run/postgresql&lease=5",
            "postgresql:///bench?host=%2Frun%2Fpostgresql",
        ),
    ],
)
def test_split_settings_keeps_urls_without_a_host_whole(url: str, kept: str) -> None:
    assert split_settings(url, SQLSettings())[0] == kept


@pytest.mark.parametrize(
    ("url", "label", "message"),
    [
        (
            "redis://cache/0?visibility=soon",
            "Redis",
            "visibility='soon' in the Redis URL is not a number",
        ),
        ("redis://cache/0?poll=0", "Redis", "poll in the Redis URL must be positive, not 0"),
        ("sqlite:///jobs.db?lease=-1", None, "lease in the sqlite URL must be positive, not -1"),
        ("postgresql://db/bench?pool=x", None, "pool='x' in the postgresql URL is not a number"),
    ],
)
def test_split_settings_says_which_parameter_is_wrong(
    url: str, label: str | None, message: str
) -> None:
    defaults = RedisSettings() if url.startswith("redis") else PostgresSettings()
    with pytest.raises(ConfigError) as caught:
        split_settings(url, defaults, label)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("redis://user:s3cret@127.0.0.1:1/0", ServiceUnavailable),
        ("amqp://u:s3cret@127.0.0.1:1/", ServiceUnavailable),
        ("postgresql://u:s3cret@127.0.0.1:1/db", ServiceUnavailable),
        ("postgresql://u@127.0.0.1:1/db?password=s3cret", ServiceUnavailable),
        ("redis://user:s3cret@127.0.0.1:notaport/0", ConfigError),
        ("amqp://u:s3cret@127.0.0.1:notaport/", ConfigError),
        ("postgresql://u:s3cret@127.0.0.1:notaport/db", ConfigError),
        ("redis://user:s3cret@127.0.0.1:1/0?visibility=soon", ConfigError),
        ("sqlite://u:s3cret@host", ConfigError),
        ("mysql://u:s3cret@127.0.0.1:1/db", UnknownBackend),
    ],
)
async def test_a_bad_or_unreachable_url_never_shows_its_password(
    url: str, error: type[MailbenchError]
) -> None:
    # Port 1 on the loopback refuses at once: nothing is started, nothing waited for.
    with pytest.raises(MailbenchError) as caught:
        await asyncio.wait_for(open_queue(url, "jobs"), 10)
    assert isinstance(caught.value, error)
    assert "s3cret" not in str(caught.value)
    # Nor does the traceback a user may see, through every chained driver error.
    assert "s3cret" not in "".join(traceback.format_exception(caught.value))
