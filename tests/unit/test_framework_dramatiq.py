"""The Dramatiq modes' brokers and actor: the settings of each configuration, and the actor
run by Dramatiq's own Worker on its StubBroker against a scripted Mailgun double (the
integration tests run the real brokers)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dramatiq import Worker
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import DEFAULT_HEARTBEAT_TIMEOUT, RedisBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import AgeLimit, Retries
from test_frameworks import REFUSED, UNAVAILABLE, dead_letters, payload, runtime

from queues.base import Email, Job, decode_job
from queues.errors import ConfigError, QueueError
from servers.frameworks import dramatiq as dq
from servers.frameworks.task import FrameworkWorkerSettings
from servers.mailgun import Outcome, SendResult

QUEUE = "mailbench"


def age_limit(broker: Any) -> int | None:
    [middleware] = [m for m in broker.middleware if isinstance(m, AgeLimit)]
    return middleware.max_age  # type: ignore[no-any-return]


def test_default_is_dramatiq_as_it_ships_with_publisher_confirms_on_rabbitmq() -> None:
    redis = dq.make_broker("redis://h:1/0?heartbeat=10", "default")
    assert isinstance(redis, RedisBroker)
    assert redis.heartbeat_timeout == DEFAULT_HEARTBEAT_TIMEOUT  # the URL's lease ignored
    assert redis.maintenance_chance == 1000 and age_limit(redis) is None
    for config in ("default", "reliable"):  # the 202 waits for the confirm in both
        amqp = dq.make_broker("amqp://u:p@h:1/", config)
        assert isinstance(amqp, RabbitmqBroker) and amqp.confirm_delivery


def test_reliable_adds_an_age_limit_and_brings_a_dead_workers_messages_back_sooner() -> None:
    redis = dq.make_broker("redis://h:1/0?heartbeat=10", "reliable")
    assert isinstance(redis, RedisBroker)
    assert redis.heartbeat_timeout == 10_000
    assert redis.maintenance_chance == dq.RELIABLE_MAINTENANCE_CHANCE
    assert age_limit(redis) == dq.RELIABLE_MAX_AGE_MS
    no_lease = dq.make_broker("redis://h:1/0", "reliable")
    assert isinstance(no_lease, RedisBroker)
    assert no_lease.heartbeat_timeout == DEFAULT_HEARTBEAT_TIMEOUT
    with pytest.raises(ConfigError, match="amqp:// or redis://"):
        dq.make_broker("sqlite:///x.db", "default")


def test_the_workers_retries_make_mailbench_attempts_with_its_backoff(tmp_path: Path) -> None:
    task, _ = runtime(tmp_path)
    retries = dq.worker_retries(FrameworkWorkerSettings(task.settings))
    assert retries.max_retries == task.settings.max_attempts - 1
    assert (retries.min_backoff, retries.max_backoff) == (10, 50)
    middleware = dq.make_middleware("default", retries)
    assert [m for m in middleware if isinstance(m, Retries)] == [retries]


def test_the_sender_publishes_with_the_job_id_as_message_id() -> None:
    broker = StubBroker()
    actor = dq.sender_actor(broker, QUEUE)
    job = Job("job-7", Email("a@example.com", "hi", "text"))
    dq.publish(actor, job)
    [raw] = list(broker.queues[QUEUE].queue)
    message = json.loads(raw)
    assert message["message_id"] == "job-7" and message["actor_name"] == "mailbench.send_email"
    assert decode_job(message["args"][0]).id == "job-7"


@pytest.fixture
def stub_worker(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """Dramatiq's Worker on a StubBroker with the worker's middleware and actor; the
    test's parameter is (config, scripted results)."""
    config, script = request.param
    task, client = runtime(tmp_path, *script)
    settings = FrameworkWorkerSettings(task.settings, config=config)
    broker = StubBroker(middleware=dq.make_middleware(config, dq.worker_retries(settings)))
    actor = dq.declare_worker_actor(broker, settings, task)
    worker = Worker(broker, worker_timeout=50, worker_threads=2)
    worker.start()
    try:
        yield broker, actor, task, client
    finally:
        worker.stop()


def run_one(broker: StubBroker, actor: Any, text: str, *, age_s: float = 0.0) -> None:
    message = actor.message(text).copy(message_id=decode_job(text).id)
    if age_s:
        message = message.copy(message_timestamp=int((time.time() - age_s) * 1000))
    broker.enqueue(message)
    broker.join(QUEUE, fail_fast=False, timeout=10_000)


@pytest.mark.parametrize("stub_worker", [("default", (UNAVAILABLE, UNAVAILABLE))], indirect=True)
def test_a_5xx_is_retried_by_dramatiq_with_the_same_key(stub_worker: Any, tmp_path: Path) -> None:
    broker, actor, task, client = stub_worker
    run_one(broker, actor, payload())
    assert client.keys == ["job-0"] * 3
    assert task.counts["retried"] == 2 and task.counts["acked"] == 1
    assert broker.dead_letters == [] and dead_letters(tmp_path) == []


@pytest.mark.parametrize(
    ("stub_worker", "calls", "reason"),
    [
        (("default", (REFUSED,)), 1, "not a valid address"),
        (("default", (UNAVAILABLE,) * 5), 5, "gave up after 5 attempts"),
    ],
    indirect=["stub_worker"],
)
def test_a_refusal_or_the_last_attempt_goes_to_dramatiqs_dead_letters_and_the_journal(
    stub_worker: Any, tmp_path: Path, calls: int, reason: str
) -> None:
    broker, actor, _, client = stub_worker
    run_one(broker, actor, payload(2))
    assert len(client.keys) == calls
    [dead] = broker.dead_letters
    assert dead.message_id == "job-2"
    [line] = dead_letters(tmp_path)
    assert line["id"] == "job-2" and reason in line["reason"]


@pytest.mark.parametrize("stub_worker", [("reliable", ())], indirect=True)
def test_reliable_dead_letters_a_message_past_its_age_limit_unsent(
    stub_worker: Any, tmp_path: Path
) -> None:
    broker, actor, _, client = stub_worker
    run_one(broker, actor, payload(4), age_s=2 * dq.RELIABLE_MAX_AGE_MS / 1000)
    assert client.keys == []
    [line] = dead_letters(tmp_path)
    assert line["id"] == "job-4" and "age limit" in line["reason"]
    assert [m.message_id for m in broker.dead_letters] == ["job-4"]


@pytest.mark.parametrize("stub_worker", [("default", ())], indirect=True)
def test_the_worker_writes_its_figures_and_pool_at_shutdown(stub_worker: Any) -> None:
    broker, actor, task, _ = stub_worker
    run_one(broker, actor, payload())
    broker.emit_after("worker_shutdown", None)
    written = json.loads(task.settings.metrics_out.read_text())
    assert written["acked"] == 1
    assert written["framework"]["name"] == "dramatiq"
    assert written["framework"]["pool"] == "1 process x 32 threads"
    assert written["framework"]["argv"][:2] == ["dramatiq", f"{dq.__name__}:setup_worker"]


def test_a_retry_after_is_the_dramatiq_retry_delay(tmp_path: Path) -> None:
    task, _ = runtime(tmp_path, SendResult(Outcome.RETRYABLE, 503, retry_after=7.0))
    with pytest.raises(dq.dramatiq.Retry) as raised:
        dq.make_actor_function(task)(payload())
    assert raised.value.delay == 7000


def test_the_depth_counts_every_message_not_yet_acked_and_a_broker_away_is_no_sample() -> None:
    probe = dq.DramatiqRedisDepth("redis://127.0.0.1:1/0?heartbeat=10", "q")
    assert probe.keys == ("dramatiq:q.msgs", "dramatiq:q.DQ.msgs")

    async def sample() -> int:
        try:
            return await probe.depth()
        finally:
            await probe.close()

    with pytest.raises(QueueError, match="could not be counted"):
        asyncio.run(sample())


def test_reliable_rides_out_a_redis_restart_and_default_does_not() -> None:
    """Dramatiq's Retries re-enqueues a retry as a new message and then acks the first,
    whatever became of the enqueue: a retry sent while Redis was restarting (refused, or
    'loading the dataset') was lost. The reliable broker's client retries those errors."""
    from redis.exceptions import BusyLoadingError
    from redis.exceptions import ConnectionError as RedisConnectionError

    def retried(config: str) -> tuple[set[type[Exception]], int]:
        broker = dq.make_broker("redis://h:1/0", config)
        assert isinstance(broker, RedisBroker)
        kwargs = broker.client.connection_pool.connection_kwargs
        retry = kwargs.get("retry")
        return set(kwargs.get("retry_on_error") or ()), (retry._retries if retry else 0)

    errors, retries = retried("reliable")
    assert {BusyLoadingError, RedisConnectionError} <= errors
    assert retries * dq.REDIS_RETRY_CAP_S >= 10  # longer than a restart takes here
    assert BusyLoadingError not in retried("default")[0]
