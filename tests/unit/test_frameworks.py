"""The framework modes' task runtime (blocking and async), Celery's settings, RQ's job
function and Procrastinate's task and retry strategy, against a
scripted Mailgun double (no broker: the integration tests run the real ones)."""

from __future__ import annotations

import asyncio
import datetime
import json
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from queues.base import Email, Job, encode_job
from servers.frameworks import procrastinate as pr
from servers.frameworks import rq as rq_module
from servers.frameworks.celery import RELIABLE_VISIBILITY_S, celery_settings
from servers.frameworks.task import (
    TASK_NAME,
    AsyncTaskRuntime,
    FrameworkWorkerSettings,
    TaskRuntime,
    replay_journal,
    strip_parameter,
)
from servers.mailgun import Inline, Outcome, SendResult
from servers.metrics import decode
from servers.phases import MAIN, write_control
from servers.worker import WorkerSettings

OK = SendResult(Outcome.SUCCESS, 200, message_id="<1@mailbench.test>")
UNAVAILABLE = SendResult(Outcome.RETRYABLE, 503, detail="503: Service Unavailable")
REFUSED = SendResult(Outcome.PERMANENT, 400, detail="400: 'to' is not a valid address")


class ScriptedMailgun:
    """Answers with the scripted results in turn (then success); keeps every call's key."""

    def __init__(self, *script: SendResult) -> None:
        self.script = deque(script)
        self.keys: list[str] = []

    def send(self, email: Email, idempotency_key: str, *, inline: Inline = ()) -> SendResult:
        self.keys.append(idempotency_key)
        return self.script.popleft() if self.script else OK


def runtime(
    tmp_path: Path, *script: SendResult, journal: Path | None = None, **overrides: object
) -> tuple[TaskRuntime, ScriptedMailgun]:
    settings = WorkerSettings(
        backend="redis://127.0.0.1:1/0",
        dead_letters_out=tmp_path / "dead-letters-0.jsonl",
        metrics_out=tmp_path / "worker-0.json",
        backoff_base=0.01,
        backoff_cap=0.05,
        **overrides,  # type: ignore[arg-type]
    )
    client = ScriptedMailgun(*script)
    return TaskRuntime(settings, client=client, journal=journal), client


def payload(n: int = 0) -> str:
    return encode_job(Job(f"job-{n}", Email(f"user{n}@example.com", "hi", "text"))).decode()


def dead_letters(tmp_path: Path) -> list[dict[str, str]]:
    path = tmp_path / "dead-letters-0.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_sent_email_is_done_with_the_job_id_as_key_and_timed(tmp_path: Path) -> None:
    task, client = runtime(tmp_path)
    assert task.deliver(payload(), 0).action == "done"
    assert client.keys == ["job-0"]
    assert task.recorder.histograms["api"].get_total_count() == 1
    assert task.recorder.histograms["queue_wait"].get_total_count() == 1
    task.write_metrics({"framework": {"name": "x"}})
    written = json.loads((tmp_path / "worker-0.json").read_text())
    assert written["acked"] == 1 and written["framework"] == {"name": "x"}


def test_a_5xx_is_a_retry_and_every_attempt_carries_the_same_key(tmp_path: Path) -> None:
    task, client = runtime(tmp_path, UNAVAILABLE, UNAVAILABLE)
    first = task.deliver(payload(), 0)
    assert first.action == "retry" and 0 <= first.delay <= 0.01
    assert task.deliver(payload(), 1).action == "retry"
    assert task.deliver(payload(), 2).action == "done"
    assert client.keys == ["job-0"] * 3
    # Queue wait is the first claim's only.
    assert task.recorder.histograms["queue_wait"].get_total_count() == 1


def test_a_retry_after_sets_the_retry_delay(tmp_path: Path) -> None:
    task, _ = runtime(tmp_path, SendResult(Outcome.RETRYABLE, 503, retry_after=7.0))
    assert task.deliver(payload(), 0).delay == 7.0


def test_a_429_is_waited_out_in_place_without_spending_an_attempt(tmp_path: Path) -> None:
    limited = SendResult(Outcome.RETRYABLE, 429, retry_after=0.01)
    task, client = runtime(tmp_path, limited, limited)
    assert task.deliver(payload(), 0).action == "done"
    assert len(client.keys) == 3 and task.counts["rate_limited"] == 2


@pytest.mark.parametrize(
    ("script", "attempt", "reason"),
    [((REFUSED,), 0, "not a valid address"), ((UNAVAILABLE,), 4, "gave up after 5 attempts")],
)
def test_a_refusal_or_the_last_attempt_is_journaled_as_a_dead_letter(
    tmp_path: Path, script: tuple[SendResult, ...], attempt: int, reason: str
) -> None:
    task, _ = runtime(tmp_path, *script)
    decision = task.deliver(payload(3), attempt)
    assert decision.action == "dead" and reason in decision.reason
    [line] = dead_letters(tmp_path)
    assert line["id"] == "job-3" and line["to"] == "user3@example.com"
    assert reason in line["reason"]


def test_a_payload_that_is_no_job_is_refused_without_a_call(tmp_path: Path) -> None:
    task, client = runtime(tmp_path)
    assert task.deliver("not json", 0).action == "dead"
    assert client.keys == [] and task.errors["invalid payload"] == 1


def test_journaled_figures_replay_into_their_phases(tmp_path: Path) -> None:
    """RQ's work-horses end with their job: their figures reach the pool's metrics file
    through the journal, each in the phase it was taken in."""
    control = tmp_path / "phases.json"
    write_control(control, [("warmup", None), (MAIN, 1.0)])  # main phase since 1970
    journal = tmp_path / "worker-0.events.jsonl"
    horse, _ = runtime(tmp_path, UNAVAILABLE, journal=journal, phase_file=control)
    horse.deliver(payload(), 0)
    horse.deliver(payload(), 1)
    horse.flush()
    pool, _ = runtime(tmp_path, journal=journal, phase_file=control)
    replay_journal(pool, journal.read_text().splitlines())
    assert pool.counts["acked"] == 1 and pool.counts["retried"] == 1
    pool.write_metrics()
    written = json.loads((tmp_path / "worker-0.json").read_text())
    assert decode(written["histograms"]["api"]).get_total_count() == 1
    assert decode(written["histograms"]["api_retryable"]).get_total_count() == 1


def test_celery_reliable_is_what_its_docs_recommend_and_default_is_untouched() -> None:
    default = celery_settings("redis://h:1/0?visibility=10", "q", "default")
    assert "task_acks_late" not in default and default["broker_transport_options"] == {}
    assert default["broker_url"] == "redis://h:1/0" and default["task_default_queue"] == "q"
    reliable = celery_settings("redis://h:1/0?visibility=10", "q", "reliable")
    assert reliable["task_acks_late"] and reliable["task_reject_on_worker_lost"]
    assert reliable["worker_prefetch_multiplier"] == 1
    assert reliable["broker_transport_options"] == {
        "visibility_timeout": 10.0,
        "unacked_restore_interval": 5,
        "unacked_restore_throttle": 1,
        # A sweeper killed holding kombu's restore lock (or whose release a Redis crash
        # lost) stops every worker's sweep until the lock expires: 300 s as it ships.
        "unacked_mutex_expire": 5,
    }
    no_lease = celery_settings("redis://h:1/0", "q", "reliable")
    assert no_lease["broker_transport_options"]["visibility_timeout"] == RELIABLE_VISIBILITY_S
    # On RabbitMQ the 2xx waits for the publisher confirm, in both configurations.
    for config in ("default", "reliable"):
        amqp = celery_settings("amqp://u:p@h:1/", "q", config)
        assert amqp["broker_transport_options"] == {"confirm_publish": True}


def test_strip_parameter_keeps_the_others() -> None:
    assert strip_parameter("redis://h/0?a=1&visibility=5&b=2", "visibility") == (
        "redis://h/0?a=1&b=2",
        5.0,
    )
    assert strip_parameter("redis://h/0", "visibility") == ("redis://h/0", None)


class FakeRQJob:
    def __init__(self, retries_left: int | None) -> None:
        self.retries_left = retries_left


@pytest.mark.parametrize(
    ("retries_left", "script", "raised", "left_after"),
    [
        (4, (UNAVAILABLE,), rq_module.RetryableSend, 4),  # RQ's Retry takes it
        (0, (UNAVAILABLE,), rq_module.DeadLettered, 0),  # the last attempt
        (None, (UNAVAILABLE,), rq_module.DeadLettered, 0),  # a job without retries
        (4, (REFUSED,), rq_module.DeadLettered, 0),  # a refusal is never retried
    ],
)
def test_the_rq_job_raises_what_rq_should_do(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    retries_left: int | None,
    script: tuple[SendResult, ...],
    raised: type[Exception],
    left_after: int | None,
) -> None:
    journal = tmp_path / "worker-0.events.jsonl"
    task, _ = runtime(tmp_path, *script, journal=journal)
    job = FakeRQJob(retries_left)
    monkeypatch.setattr(rq_module, "_runtime", task)
    monkeypatch.setattr(rq_module, "get_current_job", lambda: job)
    with pytest.raises(raised):
        rq_module.send_email(payload())
    assert job.retries_left == left_after
    assert journal.read_text()  # the horse's figures are journaled before it ends
    assert len(dead_letters(tmp_path)) == (raised is rq_module.DeadLettered)


def test_rq_reliable_cleans_up_at_the_lease_chaos_sets_and_an_idle_worker_gets_to_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, maintenance = rq_module.redis_url("redis://h:1/0?maintenance=10")
    assert (url, maintenance) == ("redis://h:1/0", 10.0)
    assert rq_module.redis_url("redis://h:1/0") == ("redis://h:1/0", None)

    given: dict[str, object] = {}
    monkeypatch.setattr(rq_module.Worker, "__init__", lambda self, *a, **kw: given.update(kw))

    class Chaos(rq_module.ReliableWorker):
        maintenance_s = 10.0

    Chaos(["q"])
    # An idle worker blocks in its dequeue for worker_ttl - 15 s before its maintenance.
    assert given == {"maintenance_interval": 10, "worker_ttl": 25}


class ScriptedAsyncMailgun(ScriptedMailgun):
    async def send(  # type: ignore[override]
        self, email: Email, idempotency_key: str, *, inline: Inline = ()
    ) -> SendResult:
        return ScriptedMailgun.send(self, email, idempotency_key, inline=inline)


def async_runtime(tmp_path: Path, *script: SendResult) -> tuple[AsyncTaskRuntime, ScriptedMailgun]:
    task, _ = runtime(tmp_path)
    client = ScriptedAsyncMailgun(*script)
    return AsyncTaskRuntime(task.settings, client=client), client


def test_the_async_runtime_decides_as_the_blocking_one(tmp_path: Path) -> None:
    limited = SendResult(Outcome.RETRYABLE, 429, retry_after=0.01)
    task, client = async_runtime(tmp_path, limited, UNAVAILABLE)
    first = asyncio.run(task.deliver_async(payload(), 0))
    assert first.action == "retry" and task.counts["rate_limited"] == 1
    assert asyncio.run(task.deliver_async(payload(), 1)).action == "done"
    assert client.keys == ["job-0"] * 3
    assert task._client is None  # no blocking client was made
    assert task.recorder.histograms["api"].get_total_count() == 1


class FakeContext:
    def __init__(self, attempts: int) -> None:
        self.job = type("Job", (), {"attempts": attempts})()


class RecordingApp:
    """Keeps the task functions ``register_tasks`` defines, as Procrastinate's App would."""

    def __init__(self) -> None:
        self.tasks: dict[str, Any] = {}
        self.periodic_kwargs: dict[str, Any] | None = None
        self.retry: Any = None

    def task(self, name: str, retry: Any = None, **_: Any) -> Any:
        def register(fn: Any) -> Any:
            self.tasks[name] = fn
            self.retry = retry if retry is not None else self.retry
            return fn

        return register

    def periodic(self, **kwargs: Any) -> Any:
        self.periodic_kwargs = kwargs
        return lambda fn: fn


def procrastinate_settings(tmp_path: Path, config: str) -> FrameworkWorkerSettings:
    task, _ = runtime(tmp_path)
    worker = replace(task.settings, backend="postgresql://u@h:1/db?stalled=9", queue_name="q")
    return FrameworkWorkerSettings(worker, config=config)


@pytest.mark.parametrize(
    ("attempts", "script", "raised"),
    [
        (0, (UNAVAILABLE,), pr.RetryableSend),
        (4, (UNAVAILABLE,), pr.DeadLettered),  # the fifth attempt is the last
        (0, (REFUSED,), pr.DeadLettered),
    ],
)
def test_the_procrastinate_task_raises_what_its_retry_strategy_should_do(
    tmp_path: Path, attempts: int, script: tuple[SendResult, ...], raised: type[Exception]
) -> None:
    task, _ = async_runtime(tmp_path, *script)
    app = RecordingApp()
    pr.register_tasks(app, task, procrastinate_settings(tmp_path, "default"))  # type: ignore[arg-type]
    assert set(app.tasks) == {TASK_NAME} and app.periodic_kwargs is None
    with pytest.raises(raised) as caught:
        asyncio.run(app.tasks[TASK_NAME](FakeContext(attempts), payload()))
    job = FakeContext(attempts).job
    decision = app.retry.get_retry_decision(exception=caught.value, job=job)
    assert (decision is not None) == (raised is pr.RetryableSend)
    assert len(dead_letters(tmp_path)) == (raised is pr.DeadLettered)


def test_procrastinate_retries_at_the_time_the_runtime_chose() -> None:
    strategy = pr.SendRetries(max_attempts=4, retry_exceptions={pr.RetryableSend})
    job = FakeContext(1).job
    before = datetime.datetime.now(datetime.UTC)
    decision = strategy.get_retry_decision(exception=pr.RetryableSend("503", 7.0), job=job)
    assert decision is not None and decision.retry_at is not None
    assert 6.9 < (decision.retry_at - before).total_seconds() < 8
    assert strategy.get_retry_decision(exception=pr.DeadLettered("x"), job=job) is None
    assert (
        strategy.get_retry_decision(exception=pr.RetryableSend("503", 1), job=FakeContext(4).job)
        is None
    )


def test_procrastinate_reliable_sweeps_stalled_jobs_and_default_is_untouched(
    tmp_path: Path,
) -> None:
    default = pr.worker_options(procrastinate_settings(tmp_path, "default"))
    assert default["queues"] == ["q"] and "stalled_worker_timeout" not in default
    reliable_settings = procrastinate_settings(tmp_path, "reliable")
    reliable = pr.worker_options(reliable_settings)
    assert (
        reliable["stalled_worker_timeout"] == 9.0 and reliable["update_heartbeat_interval"] == 3.0
    )
    app = RecordingApp()
    task, _ = async_runtime(tmp_path)
    pr.register_tasks(app, task, reliable_settings)  # type: ignore[arg-type]
    assert pr.SWEEP_TASK in app.tasks
    assert app.periodic_kwargs is not None and app.periodic_kwargs["queue"] == "q"
    assert pr.database_url("postgresql://u:p@h:1/db?stalled=9") == ("postgresql://u:p@h:1/db", 9.0)
    assert pr.database_url("postgresql://u:p@h:1/db")[1] == pr.STALLED_S


def test_a_procrastinate_queue_name_fits_its_notify_channel() -> None:
    short = "mailbench-1-procrastinate"
    assert pr.queue_of(short) == short
    long = "mailbench-20261202-031216-procrastinate-reliable"
    named = pr.queue_of(long)
    assert len(named) == pr.MAX_QUEUE_NAME and named.startswith("mailbench-2026")
    assert named == pr.queue_of(long) != pr.queue_of(long.replace("reliable", "default!"))


@pytest.mark.parametrize(
    ("framework", "url"),
    [
        ("celery", "redis://127.0.0.1:1/0?visibility=10"),
        ("rq", "redis://127.0.0.1:1/0?maintenance=10"),
        ("dramatiq", "redis://127.0.0.1:1/0?heartbeat=10"),
        ("arq", "redis://127.0.0.1:1/0"),
    ],
)
def test_a_redis_framework_depth_probe_counts_no_sample_while_its_broker_is_away(
    framework: str, url: str
) -> None:
    """Chaos restarts Redis under the depth sampler: a refused connection is a
    QueueError, which the sampler skips, not an exception that ends its thread."""
    from importlib import import_module

    from queues.errors import QueueError

    async def sample() -> int:
        probe = await import_module(f"servers.frameworks.{framework}").open_depth(url, "q")
        try:
            return int(await probe.depth())
        finally:
            await probe.close()

    with pytest.raises(QueueError, match="could not be counted"):
        asyncio.run(sample())
