"""PostgreSQL backend (asyncpg): ``postgresql://user@host:port/db``.

Claims use ``FOR UPDATE SKIP LOCKED`` and commit at once, so no transaction stays open
across the email API call. Enqueues are followed by a ``NOTIFY mailbench_jobs`` after
their commit (at most one per 10 ms); consumers ``LISTEN`` on a dedicated connection
and also poll, because notifications sent while they are disconnected are lost.

Table layout and the ``lease`` and ``poll`` parameters: :mod:`queues.sql`; ``pool`` sets
the pool size (default 10).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg

from queues.base import Delivery, Job, encode_job
from queues.errors import ConfigError, MailbenchError, QueueError, ServiceUnavailable
from queues.sql import TABLE, LeasedQueue, Settings, _Handle
from queues.urls import redact_url, split_settings

log = logging.getLogger(__name__)

CHANNEL = "mailbench_jobs"
# InternalClientError: seen when the server ends a connection in the middle of a query.
# OSError includes TimeoutError (the pool's, and wait_for's).
_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError)
# A restart or a lost connection: the pool reconnects on the next query.
_TRANSIENT = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
)

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue text NOT NULL,
    state text NOT NULL DEFAULT 'available',
    payload bytea NOT NULL,
    run_at timestamptz NOT NULL DEFAULT now(),
    locked_until timestamptz,
    locked_by text,
    reason text,
    deliveries integer NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS {TABLE}_available ON {TABLE} (queue, run_at)
    WHERE state = 'available';
CREATE INDEX IF NOT EXISTS {TABLE}_running ON {TABLE} (queue, locked_until)
    WHERE state = 'running';
"""
# A table made before rows counted their deliveries gets the column. Looked up first:
# ALTER TABLE locks the table out even when there is nothing to add.
HAS_DELIVERIES = """
SELECT 1 FROM information_schema.columns
WHERE table_schema = current_schema() AND table_name = $1 AND column_name = 'deliveries'
"""
ADD_DELIVERIES = f"ALTER TABLE {TABLE} ADD COLUMN deliveries integer NOT NULL DEFAULT 0"
ENQUEUE = f"INSERT INTO {TABLE} (queue, payload) VALUES ($1, $2)"
NOTIFY = f"SELECT pg_notify('{CHANNEL}', $1)"
NOTIFY_EVERY = 0.01  # seconds
CLAIM = f"""
WITH next AS (
    SELECT id FROM {TABLE}
    WHERE queue = $1 AND state = 'available' AND run_at <= now()
    ORDER BY run_at LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE {TABLE} AS j
SET state = 'running', locked_by = $3, locked_until = now() + make_interval(secs => $4),
    deliveries = j.deliveries + 1
FROM next WHERE j.id = next.id
RETURNING j.id, j.payload, j.deliveries
"""
NEXT_DUE = f"""
SELECT extract(epoch FROM min(run_at) - now())::float8 FROM {TABLE}
WHERE queue = $1 AND state = 'available'
"""
EXTEND = f"""
UPDATE {TABLE} SET locked_until = now() + make_interval(secs => $3)
WHERE id = ANY($1::bigint[]) AND locked_by = $2 AND state = 'running'
"""
RESCUE = f"""
UPDATE {TABLE} SET state = 'available', locked_by = NULL, locked_until = NULL
WHERE queue = $1 AND state = 'running' AND locked_until <= now()
"""
FENCE = "id = $1 AND locked_by = $2 AND state = 'running'"
UNCLAIM = f"""
UPDATE {TABLE} SET state = 'available', locked_by = NULL, locked_until = NULL,
    deliveries = greatest(deliveries - 1, 0)
WHERE id = ANY($1::bigint[]) AND locked_by = $2 AND state = 'running'
"""
ACK = f"DELETE FROM {TABLE} WHERE {FENCE}"
RETRY = f"""
UPDATE {TABLE} SET state = 'available', payload = $3,
    run_at = now() + make_interval(secs => $4), locked_by = NULL, locked_until = NULL,
    deliveries = 0
WHERE {FENCE}
"""
BURY = f"UPDATE {TABLE} SET state = 'dead', reason = $3, locked_by = NULL WHERE {FENCE}"
COUNT = f"SELECT count(*) FROM {TABLE} WHERE queue = $1 AND state = ANY($2::text[])"


@dataclass(frozen=True, slots=True)
class PostgresSettings(Settings):
    pool: int = 10


@contextlib.contextmanager
def _errors(sentence: str, error: type[MailbenchError] = QueueError) -> Iterator[None]:
    """Where asyncpg's errors become ours: one raised in the block comes out as
    ``error(f"{sentence}: {exc}")``, caused by it."""
    try:
        yield
    except _ERRORS as exc:
        raise error(f"{sentence}: {exc}") from exc


class PostgresQueue(LeasedQueue):
    def __init__(self, dsn: str, name: str, settings: PostgresSettings, pool: Any) -> None:
        super().__init__(settings)
        self._dsn = dsn
        self._url = redact_url(dsn)
        self._name = name
        self._pool = pool
        self._listener: Any = None
        self._notify_pending = False
        self._notifier: asyncio.Task[None] | None = None

    async def _call(self, action: str, method: str, sql: str, *args: Any) -> Any:
        with _errors(f"PostgreSQL at {self._url} failed to {action}"):
            return await getattr(self._pool, method)(sql, *args)

    async def _start(self) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            # Several processes may start at once; CREATE ... IF NOT EXISTS is not atomic.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", TABLE)
            await conn.execute(SCHEMA)
            if not await conn.fetchval(HAS_DELIVERIES, TABLE):
                await conn.execute(ADD_DELIVERIES)

    async def enqueue(self, job: Job) -> None:
        await self._call(f"insert job {job.id}", "execute", ENQUEUE, self._name, encode_job(job))
        self._announce()

    def _announce(self) -> None:
        # The notification follows the commit: a NOTIFY inside the insert's transaction
        # holds a database-wide lock until its commit is flushed, which serialised all
        # enqueues (55% of plain inserts at 100 concurrent here). One per NOTIFY_EVERY
        # at most, as each costs a query (50% at one enqueue at a time); the first of a
        # burst goes at once, and consumers only sleep after finding nothing to claim.
        self._wakeup.set()
        self._notify_pending = True
        if self._notifier is None:
            self._notifier = asyncio.create_task(self._notify())

    async def _notify(self) -> None:
        try:
            while self._notify_pending:
                self._notify_pending = False
                try:
                    with _errors(f"NOTIFY on PostgreSQL at {self._url} failed"):
                        await self._pool.execute(NOTIFY, self._name)
                except QueueError as exc:  # consumers poll as well
                    log.warning("%s", exc)
                await asyncio.sleep(NOTIFY_EVERY)
        finally:
            self._notifier = None

    async def _prepare_consumer(self) -> None:
        if self._listener is not None and not self._listener.is_closed():
            return
        try:
            with _errors(f"LISTEN on PostgreSQL at {self._url} failed, polling only"):
                self._listener = await asyncpg.connect(self._dsn)
                await self._listener.add_listener(CHANNEL, self._on_notify)
        except QueueError as exc:
            self._listener = None
            log.warning("%s", exc)

    def _is_transient(self, error: BaseException | None) -> bool:
        return isinstance(error, _TRANSIENT)

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        if payload == self._name:
            self._wakeup.set()

    async def _claim(self, limit: int) -> list[tuple[int, bytes, int]]:
        rows = await self._call(
            "claim jobs",
            "fetch",
            CLAIM,
            self._name,
            limit,
            self.consumer_id,
            self.settings.lease,
        )
        return [(row[0], row[1], row[2]) for row in rows]

    async def _seconds_to_next_due(self) -> float | None:
        due = await self._call("look for due jobs", "fetchval", NEXT_DUE, self._name)
        return None if due is None else max(0.0, float(due))

    async def _extend_and_rescue(self, held: list[int]) -> None:
        if held:
            lease = self.settings.lease
            await self._call("extend leases", "execute", EXTEND, held, self.consumer_id, lease)
        await self._call("rescue expired leases", "execute", RESCUE, self._name)
        await self._prepare_consumer()  # reconnect a lost listener

    async def _unclaim(self, row_ids: list[int]) -> None:
        await self._call("hand back jobs", "execute", UNCLAIM, row_ids, self.consumer_id)

    async def _settle(self, handle: _Handle, action: str, sql: str, *args: Any) -> None:
        row_id = self._release(handle)
        status = await self._call(action, "execute", sql, row_id, self.consumer_id, *args)
        if status.endswith(" 0"):
            self._lease_lost(row_id, action)

    async def ack(self, delivery: Delivery) -> None:
        await self._settle(delivery.handle, "ack", ACK)

    async def retry(self, delivery: Delivery, delay: float) -> None:
        payload = encode_job(delivery.job.next_attempt())
        await self._settle(delivery.handle, "retry", RETRY, payload, max(0.0, delay))

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        await self._settle(delivery.handle, "dead-letter", BURY, reason)

    async def _bury(self, row_id: int, reason: str) -> None:
        await self._call("dead-letter", "execute", BURY, row_id, self.consumer_id, reason)

    async def depth(self) -> int:
        """Rows due or waiting out a retry, and rows claimed by any consumer."""
        states = ["available", "running"]
        return int(await self._call("count jobs", "fetchval", COUNT, self._name, states))

    async def dead_letters(self) -> int:
        return int(await self._call("count dead letters", "fetchval", COUNT, self._name, ["dead"]))

    async def close(self) -> None:
        if self._closed.is_set():
            return
        await self._stop_consuming()
        if self._notifier is not None:
            await self._notifier
        if self._listener is not None:
            with contextlib.suppress(QueueError), _errors("closing the listener failed"):
                await self._listener.close()
        try:
            with _errors("closing the pool failed"):
                await asyncio.wait_for(self._pool.close(), timeout=10)
        except QueueError:
            self._pool.terminate()


async def open_postgres(url: str, name: str) -> PostgresQueue:
    dsn, settings = split_settings(url, PostgresSettings())
    shown = redact_url(dsn)
    try:
        with _errors(f"cannot connect to PostgreSQL at {shown}", ServiceUnavailable):
            pool = await asyncpg.create_pool(dsn, min_size=1, max_size=settings.pool, timeout=10)
    except ValueError as exc:  # a port or parameter that does not parse
        raise ConfigError(f"the PostgreSQL URL {shown} cannot be used: {exc}") from exc
    queue = PostgresQueue(dsn, name, settings, pool)
    try:
        with _errors(f"cannot create the jobs table on {shown}", ServiceUnavailable):
            await queue._start()
    except ServiceUnavailable:
        pool.terminate()
        raise
    return queue
