"""``Retry-After`` as the API client reads it: capped at a documented maximum, and
garbage ignored. A huge value used to reach the queue as the retry's delay, which
RabbitMQ's wait queues could not hold: the settle failed and the delivery stayed unsettled."""

from __future__ import annotations

import email.utils
import logging
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from servers.mailgun import MAX_RETRY_AFTER, Outcome, classify, parse_retry_after


def http_date(seconds_from_now: float) -> str:
    when = datetime.now(UTC) + timedelta(seconds=seconds_from_now)
    return email.utils.format_datetime(when, usegmt=True)


def test_the_cap_is_an_hour() -> None:
    assert MAX_RETRY_AFTER == 3600.0


@pytest.mark.parametrize("header", ["99999999", "10001", "3601.5", http_date(30 * 86_400)])
def test_a_retry_after_beyond_the_cap_is_taken_as_the_cap_and_logged(
    header: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="servers.mailgun"):
        assert parse_retry_after(header) == MAX_RETRY_AFTER
    assert "Retry-After" in caplog.text and "3600 s" in caplog.text


def test_a_retry_after_within_the_cap_is_kept_and_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="servers.mailgun"):
        assert parse_retry_after("3600") == 3600.0
        assert parse_retry_after("0.25") == 0.25
        in_a_minute = parse_retry_after(http_date(60))
    assert in_a_minute is not None and 55 <= in_a_minute <= 60
    assert caplog.text == ""


@pytest.mark.parametrize(
    "header",
    ["", "soon", "1e400", "nan", "-inf", "Mon, 32", "0, 0 Jan 0 0:0:0", ", , ,", "3 s", "0x10"],
)
def test_a_malformed_retry_after_is_ignored(header: str) -> None:
    assert parse_retry_after(header) is None


def test_a_429_with_a_huge_retry_after_asks_for_the_cap() -> None:
    request = httpx.Request("POST", "http://mailgun.test/v3/mailbench.test/messages")
    response = httpx.Response(429, headers={"Retry-After": "86400"}, request=request)
    result = classify(response)
    assert (result.outcome, result.retry_after) == (Outcome.RETRYABLE, MAX_RETRY_AFTER)
