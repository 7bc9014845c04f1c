"""arq's modes: the async task runtime, arq's settings per configuration, and arq's task
and sender in arq's own venv (.venv-arq: arq pins redis-py < 6), against a scripted
Mailgun double (no broker: the integration tests run the real one)."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from collections import deque
from pathlib import Path

import pytest

from harness.errors import ProcessFailed
from harness.process import mailbench_command, venv_python
from queues.base import Email, Job, encode_job
from servers.frameworks.arq import (
    DEFAULT_JOB_TIMEOUT_S,
    RELIABLE_JOB_TIMEOUT_S,
    SPARE_TRIES,
    attempt_of,
    worker_options,
)
from servers.frameworks.task import AsyncTaskRuntime, FrameworkWorkerSettings
from servers.mailgun import Inline, Outcome, SendResult
from servers.modes import MODES
from servers.worker import WorkerSettings

OK = SendResult(Outcome.SUCCESS, 200, message_id="<1@mailbench.test>")
UNAVAILABLE = SendResult(Outcome.RETRYABLE, 503, detail="503: Service Unavailable")
LIMITED = SendResult(Outcome.RETRYABLE, 429, detail="429", retry_after=0.01)


class AsyncScriptedMailgun:
    """Answers with the scripted results in turn (then success); keeps every call's key."""

    def __init__(self, *script: SendResult) -> None:
        self.script = deque(script)
        self.keys: list[str] = []

    async def send(self, email: Email, idempotency_key: str, *, inline: Inline = ()) -> SendResult:
        self.keys.append(idempotency_key)
        return self.script.popleft() if self.script else OK


def settings(tmp_path: Path, **overrides: object) -> WorkerSettings:
    return WorkerSettings(
        backend="redis://127.0.0.1:1/0",
        queue_name="q",
        dead_letters_out=tmp_path / "dead-letters-0.jsonl",
        metrics_out=tmp_path / "worker-0.json",
        backoff_base=0.01,
        backoff_cap=0.05,
        **overrides,  # type: ignore[arg-type]
    )


def payload() -> str:
    return encode_job(Job("job-0", Email("user@example.com", "hi", "text"))).decode()


async def test_the_async_runtime_retries_waits_out_429s_and_dead_letters(tmp_path: Path) -> None:
    client = AsyncScriptedMailgun(UNAVAILABLE, LIMITED, OK)
    task = AsyncTaskRuntime(settings(tmp_path, max_attempts=2), client=client)
    first = await task.deliver_async(payload(), 0)
    assert first.action == "retry" and 0 <= first.delay <= 0.01
    assert (await task.deliver_async(payload(), 1)).action == "done"  # the 429 waited out in place
    assert client.keys == ["job-0"] * 3
    assert task.counts == {"retried": 1, "rate_limited": 1, "acked": 1}
    assert task.recorder.histograms["queue_wait"].get_total_count() == 1

    client.script.extend([UNAVAILABLE])
    assert (await task.deliver_async(payload(), 1)).action == "dead"  # its last attempt failed
    lines = (tmp_path / "dead-letters-0.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["job-0"]
    await task.aclose()


def test_arq_reliable_shortens_the_in_progress_lease_and_default_is_arqs(tmp_path: Path) -> None:
    worker = settings(tmp_path, concurrency=200)
    default = worker_options(FrameworkWorkerSettings(worker, "default"))
    reliable = worker_options(FrameworkWorkerSettings(worker, "reliable"))
    assert default == {
        "queue_name": "q", "max_jobs": 200, "job_timeout": DEFAULT_JOB_TIMEOUT_S,
        "max_tries": worker.max_attempts,
    }  # fmt: skip
    assert reliable["job_timeout"] == RELIABLE_JOB_TIMEOUT_S < DEFAULT_JOB_TIMEOUT_S
    assert reliable["max_tries"] == worker.max_attempts + SPARE_TRIES
    # arq counts every start; a start past mailbench's attempts is its last.
    assert [attempt_of(t, 5) for t in (1, 2, 5, 6, 10)] == [0, 1, 4, 4, 4]


def test_the_arq_modes_run_in_their_own_venv_and_a_missing_one_says_how_to_make_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert {MODES["arq"].python, MODES["arq-reliable"].python} == {"arq"}
    assert MODES["rq"].python is None
    assert mailbench_command("serve")[0] == venv_python(None)
    monkeypatch.setenv("MAILBENCH_PYTHON_ARQ", str(tmp_path / "nowhere" / "python"))
    with pytest.raises(ProcessFailed, match=r"make install"):
        mailbench_command("arq-worker", python="arq")


ARQ_SCRIPT = """
import asyncio, json, sys
from pathlib import Path
import redis
from arq import Retry
import harness.cli, servers.web.app  # what the harness starts in this venv
from servers.frameworks.arq import DeadLettered, redis_settings, send_email
from servers.frameworks.task import AsyncTaskRuntime
from servers.mailgun import Outcome, SendResult
from servers.senders.arq import ArqSender
from servers.worker import WorkerSettings

class Mailgun:
    def __init__(self, *results):
        self.results = list(results)
    async def send(self, email, key, *, inline=()):
        return self.results.pop(0)

async def main():
    tmp = Path(sys.argv[1])
    settings = WorkerSettings(backend="redis://127.0.0.1:1/0", max_attempts=2,
                              dead_letters_out=tmp / "dead.jsonl", backoff_cap=0.05)
    runtime = AsyncTaskRuntime(settings, client=Mailgun(
        SendResult(Outcome.RETRYABLE, 503, detail="503", retry_after=7.0),
        SendResult(Outcome.RETRYABLE, 503, detail="503"),
        SendResult(Outcome.SUCCESS, 200)))
    found = {"redis": redis.__version__}
    try:
        await send_email({"runtime": runtime, "job_try": 1}, sys.argv[2])
    except Retry as retry:
        found["retry_defer_ms"] = retry.defer_score
    try:
        await send_email({"runtime": runtime, "job_try": 2}, sys.argv[2])
    except DeadLettered:
        found["dead"] = (tmp / "dead.jsonl").read_text().count("\\n")
    found["done"] = await send_email({"runtime": runtime, "job_try": 1}, sys.argv[2]) is None
    found["password"] = redis_settings("redis://default:p%40ss@127.0.0.1:7/2").password
    found["sender"] = ArqSender.__name__
    print(json.dumps(found))

asyncio.run(main())
"""


def test_arqs_task_raises_arqs_retry_in_arqs_own_venv(tmp_path: Path) -> None:
    try:
        python = venv_python("arq")
    except ProcessFailed as exc:
        if os.environ.get("CI") == "true":
            raise  # CI's `make test` makes .venv-arq
        pytest.skip(f"arq's venv is not made here: {exc}")
    done = subprocess.run(
        [python, "-c", textwrap.dedent(ARQ_SCRIPT), str(tmp_path), payload()],
        capture_output=True, text=True, timeout=60, env=os.environ.copy(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.splitlines()[-1])
    assert found["redis"].startswith("5.")  # the pin that keeps arq out of .venv
    assert found["retry_defer_ms"] == 7000  # the API's Retry-After, as arq's defer
    assert found["dead"] == 1 and found["done"] is True
    assert found["password"] == "p@ss" and found["sender"] == "ArqSender"
