"""Huey's modes: its settings per configuration, and the task run by huey itself on a
real SqliteHuey file (``huey.execute`` of what ``huey.dequeue`` gives, as the consumer's
worker threads do), against a scripted Mailgun double."""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path

import pytest
from test_frameworks import REFUSED, UNAVAILABLE, ScriptedMailgun, dead_letters, payload, runtime

from queues.base import Email, Job
from servers.frameworks.huey import (
    RETRIES,
    STOP_GRACE_S,
    consumer_argv,
    consumer_settings,
    enqueue,
    huey_settings,
    make_huey,
    open_depth,
)
from servers.mailgun import Inline, SendResult


def queue_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'huey.db'}"


def test_reliable_is_what_hueys_docs_recommend_and_default_is_untouched() -> None:
    assert huey_settings("default") == {}
    assert huey_settings("reliable") == {"fsync": True}
    assert consumer_settings("default", 32) == {"workers": 32, "worker_type": "thread"}
    reliable = consumer_settings("reliable", 32)
    assert reliable["graceful_signal"] == "TERM" and reliable["shutdown_timeout"] == STOP_GRACE_S
    assert consumer_argv(reliable)[2:] == ["-k", "thread", "-w", "32", "-g", "TERM", "-t", "20"]


def test_the_task_is_retried_by_huey_with_the_runtimes_delay_and_the_same_key(
    tmp_path: Path,
) -> None:
    task_runtime, client = runtime(tmp_path, SendResult(UNAVAILABLE.outcome, 503, retry_after=7.0))
    huey, send_email = make_huey(queue_url(tmp_path), "q", "default", task_runtime)
    enqueue(send_email, Job("job-0", Email("user0@example.com", "hi", "text")))
    before = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    huey.execute(huey.dequeue())
    assert huey.pending_count() == 0 and huey.scheduled_count() == 1
    [retry] = huey.scheduled()
    assert retry.id == "job-0" and retry.retries == RETRIES - 1
    assert 6.0 <= (retry.eta - before).total_seconds() <= 8.0  # Retry-After, not 1 s
    [due] = huey.read_schedule(retry.eta)  # what the consumer's scheduler reads at its eta
    huey.execute(due, retry.eta)
    assert client.keys == ["job-0", "job-0"] and huey.scheduled_count() == 0
    assert task_runtime.counts["acked"] == 1 and task_runtime.counts["retried"] == 1


@pytest.mark.parametrize(("script", "retries_left"), [((REFUSED,), RETRIES), ((UNAVAILABLE,), 0)])
def test_a_refusal_or_the_last_attempt_is_journaled_and_not_retried(
    tmp_path: Path, script: tuple[SendResult, ...], retries_left: int
) -> None:
    task_runtime, client = runtime(tmp_path, *script)
    huey, send_email = make_huey(queue_url(tmp_path), "q", "default", task_runtime)
    huey.enqueue(send_email.s(payload(3), id="job-3", retries=retries_left))
    huey.execute(huey.dequeue())
    assert huey.pending_count() == 0 and huey.scheduled_count() == 0
    [line] = dead_letters(tmp_path)
    assert line["id"] == "job-3" and len(client.keys) == 1


class Interrupted(ScriptedMailgun):
    """A send cut short by the consumer's shutdown (KeyboardInterrupt in the task)."""

    def send(self, email: Email, idempotency_key: str, *, inline: Inline = ()) -> SendResult:
        raise KeyboardInterrupt


@pytest.mark.parametrize(("config", "requeued"), [("default", 0), ("reliable", 1)])
def test_only_reliable_enqueues_a_task_the_shutdown_interrupted(
    tmp_path: Path, config: str, requeued: int
) -> None:
    task_runtime, _ = runtime(tmp_path)
    task_runtime.client = Interrupted()
    huey, send_email = make_huey(queue_url(tmp_path), "q", config, task_runtime)
    enqueue(send_email, Job("job-1", Email("user1@example.com", "hi", "text")))
    huey.execute(huey.dequeue())  # huey emits SIGNAL_INTERRUPTED
    assert huey.pending_count() == requeued
    assert [t.id for t in huey.pending()] == ["job-1"] * requeued


def test_the_depth_counts_waiting_and_scheduled_tasks(tmp_path: Path) -> None:
    url = queue_url(tmp_path)

    async def depth() -> int:
        probe = await open_depth(url, "q")
        try:
            return await probe.depth()
        finally:
            await probe.close()

    assert asyncio.run(depth()) == 0  # no tables yet: nothing enqueued
    huey, send_email = make_huey(url, "q", "default")
    enqueue(send_email, Job("job-1", Email("user1@example.com", "hi", "text")))
    huey.add_schedule(send_email.s(payload(2), id="job-2", delay=60))  # a retry waiting
    assert (huey.pending_count(), huey.scheduled_count()) == (1, 1)
    assert asyncio.run(depth()) == 2
    huey.dequeue()  # taken by a worker: huey deleted its row, nothing counts it
    assert asyncio.run(depth()) == 1
