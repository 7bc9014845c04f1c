"""A run replaces a worker that exited by itself (a poison job kills each worker it
reaches until one dead-letters it), and its drain waits a lease longer for each."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.process import Children
from harness.run import tiers as tiers_module
from harness.run.config import RunConfig
from harness.run.tiers import DEFAULT_REDELIVERY_S, Tiers, TierStarter, redelivery_s
from queues.redis import Settings as RedisSettings
from queues.sql import Settings as SqlSettings
from servers.modes import mode

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def children() -> Iterator[Children]:
    with Children() as started:
        yield started


def exited(children: Children, tmp_path: Path, name: str, code: int) -> Tiers:
    """A mode's tiers whose one worker has exited with ``code``."""
    tiers = Tiers(mode("sqlite"), "sqlite", tmp_path, "http://127.0.0.1:9", 9, "memory://x", "q")
    argv = [sys.executable, "-c", f"raise SystemExit({code})"]
    worker = children.start(name, argv, tmp_path / "dead.log")
    worker.process.wait(10)
    tiers.workers.append(worker)
    return tiers


def test_a_worker_that_exited_by_itself_is_replaced_and_noted(
    children: Children, tmp_path: Path
) -> None:
    starter = TierStarter(RunConfig(out=tmp_path), children, "http://127.0.0.1:9", "secret")
    tiers = exited(children, tmp_path, "worker 0 (sqlite)", 70)
    notes = starter.replace_exited_workers(tiers)
    assert notes == ["worker 0 (sqlite) exited by itself (code 70); started worker 0 (sqlite)"]
    [replacement] = tiers.workers
    assert replacement.alive() and tiers.replaced == 1
    assert starter.replace_exited_workers(tiers) == []  # a live worker is left alone


def test_replacements_stop_at_a_bound(
    children: Children, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tiers_module, "MAX_REPLACEMENTS", 0)
    starter = TierStarter(RunConfig(out=tmp_path), children, "http://127.0.0.1:9", "secret")
    tiers = exited(children, tmp_path, "worker 0 (sqlite)", 1)
    [note] = starter.replace_exited_workers(tiers)
    assert "not replaced" in note and tiers.workers == []


def test_redelivery_is_the_lease_the_url_sets_or_the_backends_default() -> None:
    assert DEFAULT_REDELIVERY_S == SqlSettings().lease == RedisSettings().visibility
    assert redelivery_s(mode("sqlite"), "sqlite:///jobs.db?lease=10&poll=0.05") == 10.0
    assert redelivery_s(mode("redis"), "redis://127.0.0.1:6379/0") == DEFAULT_REDELIVERY_S
    assert redelivery_s(mode("rabbitmq"), "amqp://127.0.0.1:5672/") == 0.0  # at once
    assert redelivery_s(mode("redis"), None) == 0.0
