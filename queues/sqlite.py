"""SQLite backend: ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``.

One file in WAL mode with ``synchronous=NORMAL`` (durable against a process crash, not
a power loss). The stdlib driver runs on one dedicated thread that owns the connection,
so disk I/O never blocks the event loop; writes issued while that thread is busy are
grouped into the next ``BEGIN IMMEDIATE`` transaction (group commit), and each caller
still returns only after its own commit. Table layout and parameters: :mod:`queues.sql`
(``poll`` defaults to 0.05 s here: other processes cannot signal new rows).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from harness.errors import ConfigError, QueueError, ServiceUnavailable
from queues.base import Delivery, Job, encode_job
from queues.sql import TABLE, LeasedQueue, Settings, _Handle, parse_url

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    id INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'available',
    payload BLOB NOT NULL,
    run_at REAL NOT NULL,
    locked_until REAL,
    locked_by TEXT,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS {TABLE}_available ON {TABLE} (queue, run_at)
    WHERE state = 'available';
CREATE INDEX IF NOT EXISTS {TABLE}_running ON {TABLE} (queue, locked_until)
    WHERE state = 'running';
"""
FENCE = "id = ? AND locked_by = ? AND state = 'running'"
BURY = f"UPDATE {TABLE} SET state = 'dead', reason = ?, locked_by = NULL WHERE {FENCE}"


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.executescript(f"BEGIN IMMEDIATE; {SCHEMA} COMMIT;")
    return conn


def _transaction(conn: sqlite3.Connection, ops: list[Op]) -> list[Any]:
    # IMMEDIATE takes the write lock up front: a deferred transaction that upgrades to a
    # write gets SQLITE_BUSY at once instead of waiting out busy_timeout.
    conn.execute("BEGIN IMMEDIATE")
    try:
        results = [op(conn) for op in ops]
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return results


class SQLiteQueue(LeasedQueue):
    def __init__(self, path: str, name: str, settings: Settings) -> None:
        super().__init__(settings)
        self._path = path
        self._name = name
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mailbench-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._pending: list[tuple[Op, asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)
        except sqlite3.Error as exc:
            raise QueueError(f"SQLite database {self._path} failed: {exc}") from exc

    def _is_transient(self, error: BaseException | None) -> bool:
        # "database is locked": another process held the write lock past busy_timeout.
        return isinstance(error, sqlite3.OperationalError) and "locked" in str(error)

    async def _start(self) -> None:
        self._conn = await self._run(_connect, self._path)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            raise QueueError(f"the SQLite queue on {self._path} is closed")
        return await self._run(fn, self._conn)

    async def _write(self, op: Op) -> Any:
        """Run ``op`` in the next write transaction; return once it has committed."""
        if self._conn is None:
            raise QueueError(f"the SQLite queue on {self._path} is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    results = await self._run(_transaction, self._conn, [op for op, _ in batch])
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                else:
                    for (_, future), result in zip(batch, results, strict=True):
                        if not future.done():
                            future.set_result(result)
        finally:
            self._flusher = None

    async def enqueue(self, job: Job) -> None:
        payload = encode_job(job)
        await self._write(
            lambda c: c.execute(
                f"INSERT INTO {TABLE} (queue, payload, run_at) VALUES (?, ?, ?)",
                (self._name, payload, time.time()),
            )
        )
        self._wakeup.set()

    async def _claim(self, limit: int) -> list[tuple[int, bytes]]:
        def claim(c: sqlite3.Connection) -> list[tuple[int, bytes]]:
            now = time.time()
            return c.execute(
                f"UPDATE {TABLE} SET state = 'running', locked_by = ?, locked_until = ?"
                f" WHERE id IN (SELECT id FROM {TABLE} WHERE queue = ? AND state = 'available'"
                "  AND run_at <= ? ORDER BY run_at LIMIT ?)"
                " RETURNING id, payload",
                (self.consumer_id, now + self.settings.lease, self._name, now, limit),
            ).fetchall()

        rows: list[tuple[int, bytes]] = await self._write(claim)
        return rows

    async def _seconds_to_next_due(self) -> float | None:
        def next_due(c: sqlite3.Connection) -> float | None:
            (run_at,) = c.execute(
                f"SELECT min(run_at) FROM {TABLE} WHERE queue = ? AND state = 'available'",
                (self._name,),
            ).fetchone()
            return None if run_at is None else max(0.0, run_at - time.time())

        return await self._read(next_due)

    async def _extend_and_rescue(self, held: list[int]) -> None:
        def upkeep(c: sqlite3.Connection) -> None:
            now = time.time()
            c.executemany(
                f"UPDATE {TABLE} SET locked_until = ? WHERE {FENCE}",
                [(now + self.settings.lease, row_id, self.consumer_id) for row_id in held],
            )
            c.execute(
                f"UPDATE {TABLE} SET state = 'available', locked_by = NULL, locked_until = NULL"
                " WHERE queue = ? AND state = 'running' AND locked_until <= ?",
                (self._name, now),
            )

        await self._write(upkeep)

    async def _unclaim(self, row_ids: list[int]) -> None:
        await self._write(
            lambda c: c.executemany(
                f"UPDATE {TABLE} SET state = 'available', locked_by = NULL, locked_until = NULL"
                f" WHERE {FENCE}",
                [(row_id, self.consumer_id) for row_id in row_ids],
            )
        )

    async def _settle(self, handle: _Handle, action: str, sql: str, *args: Any) -> None:
        row_id = self._release(handle)
        cursor = await self._write(lambda c: c.execute(sql, (*args, row_id, self.consumer_id)))
        if cursor.rowcount == 0:
            self._lease_lost(row_id, action)

    async def ack(self, delivery: Delivery) -> None:
        await self._settle(delivery.handle, "ack", f"DELETE FROM {TABLE} WHERE {FENCE}")

    async def retry(self, delivery: Delivery, delay: float) -> None:
        await self._settle(
            delivery.handle,
            "retry",
            f"UPDATE {TABLE} SET state = 'available', payload = ?, run_at = ?,"
            f" locked_by = NULL, locked_until = NULL WHERE {FENCE}",
            encode_job(delivery.job.next_attempt()),
            time.time() + max(0.0, delay),
        )

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        await self._settle(delivery.handle, "dead-letter", BURY, reason)

    async def _bury(self, row_id: int, reason: str) -> None:
        await self._write(lambda c: c.execute(BURY, (reason, row_id, self.consumer_id)))

    async def _count(self, states: str) -> int:
        def count(c: sqlite3.Connection) -> int:
            sql = f"SELECT count(*) FROM {TABLE} WHERE queue = ? AND state IN ({states})"
            (n,) = c.execute(sql, (self._name,)).fetchone()
            return int(n)

        return await self._read(count)

    async def depth(self) -> int:
        return await self._count("'available', 'running'")

    async def dead_letters(self) -> int:
        return await self._count("'dead'")

    async def close(self) -> None:
        if self._conn is None:
            return
        await self._stop_consuming()
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        conn, self._conn = self._conn, None
        await self._run(conn.close)
        self._thread.shutdown(wait=False)


def sqlite_path(url: str) -> str:
    path = urlsplit(url).path
    if not path.startswith("/") or len(path) < 2:
        raise ConfigError(f"a SQLite URL names a file, as sqlite:///relative.db: {url!r}")
    return path[1:]


async def open_sqlite(url: str, name: str) -> SQLiteQueue:
    _, settings = parse_url(url, Settings(poll=0.05))
    path = sqlite_path(url)
    if not Path(path).parent.is_dir():
        raise ConfigError(f"the folder of the SQLite database {path} does not exist")
    queue = SQLiteQueue(path, name, settings)
    try:
        await queue._start()
    except QueueError as exc:
        queue._thread.shutdown(wait=False)
        raise ServiceUnavailable(f"cannot open the SQLite database {path}: {exc}") from exc
    return queue
