"""The job wire format shared by every backend."""

from __future__ import annotations

import json
import time
from dataclasses import FrozenInstanceError

import pytest

from harness.errors import InvalidJob, QueueError
from queues import Email, Job, decode_job, encode_job

EMAIL = Email(to="ada@example.com", subject="Grüße ✉", text="line one\nline two")


def test_round_trip_keeps_every_field() -> None:
    job = Job(id="k-1", email=EMAIL, enqueued_at=1_700_000_000.123456, attempt=3)
    assert decode_job(encode_job(job)) == job


def test_decode_accepts_text_as_well_as_bytes() -> None:
    job = Job(id="k-2", email=EMAIL)
    assert decode_job(encode_job(job).decode()) == job


def test_encoding_is_compact_versioned_utf8_json() -> None:
    data = encode_job(Job(id="k-3", email=EMAIL, enqueued_at=1.5))
    assert b'": ' not in data and b', "' not in data  # no padding after separators
    assert "Grüße ✉".encode() in data  # not \u-escaped
    payload = json.loads(data)
    assert payload["v"] == 1
    assert payload["id"] == "k-3" and payload["attempt"] == 0 and payload["enqueued_at"] == 1.5


def test_new_job_is_stamped_now_and_next_attempt_changes_only_attempt() -> None:
    before = time.time()
    job = Job(id="k-4", email=EMAIL)
    assert before <= job.enqueued_at <= time.time()
    retry = job.next_attempt()
    assert retry.attempt == 1
    assert (retry.id, retry.email, retry.enqueued_at) == (job.id, job.email, job.enqueued_at)
    assert job.attempt == 0
    with pytest.raises(FrozenInstanceError):
        job.attempt = 5  # type: ignore[misc]


def _valid() -> dict[str, object]:
    return json.loads(encode_job(Job(id="k-5", email=EMAIL)))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe not utf-8",
        b"not json",
        b"[1, 2, 3]",
        b"null",
        json.dumps({**_valid(), "v": 2}).encode(),
        json.dumps({k: v for k, v in _valid().items() if k != "email"}).encode(),
        json.dumps({k: v for k, v in _valid().items() if k != "id"}).encode(),
        json.dumps({**_valid(), "email": "ada@example.com"}).encode(),
        json.dumps({**_valid(), "email": {"to": "ada@example.com"}}).encode(),
        json.dumps({**_valid(), "attempt": "second"}).encode(),
        json.dumps({**_valid(), "enqueued_at": None}).encode(),
    ],
    ids=[
        "empty",
        "not-utf8",
        "not-json",
        "list",
        "null",
        "future-version",
        "no-email",
        "no-id",
        "email-not-object",
        "email-incomplete",
        "attempt-not-int",
        "enqueued-at-null",
    ],
)
def test_anything_else_raises_invalid_job(data: bytes) -> None:
    with pytest.raises(InvalidJob, match="not a mailbench job"):
        decode_job(data)


def test_invalid_job_is_a_queue_error_that_keeps_its_cause() -> None:
    with pytest.raises(QueueError) as caught:
        decode_job(b"{")
    assert isinstance(caught.value, InvalidJob)
    assert isinstance(caught.value.__cause__, ValueError)
