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
import contextlib
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import Any, TypeVar
from urllib.parse import urlsplit

from queues.base import Delivery, Job, encode_job
from queues.errors import ConfigError, QueueError, ServiceUnavailable
from queues.sql import TABLE, LeasedQueue, Settings, _Handle
from queues.urls import redact_url, split_settings

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
    reason TEXT,
    deliveries INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS {TABLE}_available ON {TABLE} (queue, run_at)
    WHERE state = 'available';
CREATE INDEX IF NOT EXISTS {TABLE}_running ON {TABLE} (queue, locked_until)
    WHERE state = 'running';
"""
FENCE = "id = ? AND locked_by = ? AND state = 'running'"
BURY = f"UPDATE {TABLE} SET state = 'dead', reason = ?, locked_by = NULL WHERE {FENCE}"


@contextlib.contextmanager
def _errors(sentence: str) -> Iterator[None]:
    """Where sqlite3's errors become ours: one raised in the block comes out as
    ``QueueError(f"{sentence}: {exc}")``, caused by it. The database thread hands them
    over as they are, so they are mapped here, where the caller awaits."""
    try:
        yield
    except sqlite3.Error as exc:
        raise QueueError(f"{sentence}: {exc}") from exc


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.executescript(f"BEGIN IMMEDIATE; {SCHEMA}")
    columns = {row[1] for row in conn.execute(f"PRAGMA table_info({TABLE})")}
    if "deliveries" not in columns:  # a file made before rows counted their deliveries
        conn.execute(f"ALTER TABLE {TABLE} ADD COLUMN deliveries INTEGER NOT NULL DEFAULT 0")
    conn.execute("COMMIT")
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


@dataclass(frozen=True, slots=True)
class _Op:
    run: Callable[[sqlite3.Connection], Any]
    done: asyncio.Future[Any]
    write: bool


def _serve(path: str, inbox: SimpleQueue[_Op | None], loop: asyncio.AbstractEventLoop) -> None:
    """The database thread: owns the connection; runs every write queued meanwhile in
    one transaction, then hands the results back to the event loop."""
    conn: sqlite3.Connection | None = None
    stop = False
    while not stop:
        batch = [inbox.get()]
        with contextlib.suppress(Empty):
            while True:
                batch.append(inbox.get_nowait())
        stop = None in batch
        writes = [op for op in batch if op is not None and op.write]
        reads = [op for op in batch if op is not None and not op.write]
        outcomes: list[Any] = []
        try:
            conn = conn or _connect(path)
            outcomes = _transaction(conn, [op.run for op in writes]) if writes else []
            for op in reads:
                try:
                    outcomes.append(op.run(conn))
                except Exception as exc:
                    outcomes.append(exc)
        except Exception as exc:  # each caller gets it, wrapped on the loop's side
            outcomes += [exc] * (len(writes) + len(reads) - len(outcomes))
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
            loop.call_soon_threadsafe(_hand_over, writes + reads, outcomes)
    if conn is not None:
        conn.close()


def _hand_over(ops: list[_Op], outcomes: list[Any]) -> None:
    for op, outcome in zip(ops, outcomes, strict=True):
        if op.done.done():
            continue
        if isinstance(outcome, Exception):
            op.done.set_exception(outcome)
        else:
            op.done.set_result(outcome)


class SQLiteQueue(LeasedQueue):
    def __init__(self, path: str, name: str, settings: Settings) -> None:
        super().__init__(settings)
        self._path = path
        self._name = name
        self._inbox: SimpleQueue[_Op | None] = SimpleQueue()
        self._open = True
        # A plain thread and queue rather than an executor: two thread hops per batch
        # and no task in between, which matters for one enqueue at a time.
        self._thread = threading.Thread(
            target=_serve,
            args=(path, self._inbox, asyncio.get_running_loop()),
            name=f"mailbench-sqlite-{name}",
            daemon=True,
        )
        self._thread.start()
        weakref.finalize(self, self._inbox.put, None)  # forgotten without close()

    def _is_transient(self, error: BaseException | None) -> bool:
        # "database is locked": another process held the write lock past busy_timeout.
        return isinstance(error, sqlite3.OperationalError) and "locked" in str(error)

    async def _submit(self, run: Callable[[sqlite3.Connection], T], write: bool) -> T:
        if not self._open:
            raise QueueError(f"the SQLite queue on {self._path} is closed")
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._inbox.put(_Op(run, done, write))
        with _errors(f"SQLite database {self._path} failed"):
            return await done

    async def _read(self, run: Callable[[sqlite3.Connection], T]) -> T:
        return await self._submit(run, write=False)

    async def _write(self, run: Op) -> Any:
        """Run ``run`` in the next write transaction; return once it has committed."""
        return await self._submit(run, write=True)

    async def _start(self) -> None:
        await self._read(lambda c: None)  # the thread has connected and made the table

    async def enqueue(self, job: Job) -> None:
        payload = encode_job(job)
        await self._write(
            lambda c: c.execute(
                f"INSERT INTO {TABLE} (queue, payload, run_at) VALUES (?, ?, ?)",
                (self._name, payload, time.time()),
            )
        )
        self._wakeup.set()

    async def _claim(self, limit: int) -> list[tuple[int, bytes, int]]:
        def claim(c: sqlite3.Connection) -> list[tuple[int, bytes, int]]:
            now = time.time()
            return c.execute(
                f"UPDATE {TABLE} SET state = 'running', locked_by = ?, locked_until = ?,"
                " deliveries = deliveries + 1"
                f" WHERE id IN (SELECT id FROM {TABLE} WHERE queue = ? AND state = 'available'"
                "  AND run_at <= ? ORDER BY run_at LIMIT ?)"
                " RETURNING id, payload, deliveries",
                (self.consumer_id, now + self.settings.lease, self._name, now, limit),
            ).fetchall()

        rows: list[tuple[int, bytes, int]] = await self._write(claim)
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
                f"UPDATE {TABLE} SET state = 'available', locked_by = NULL, locked_until = NULL,"
                f" deliveries = max(deliveries - 1, 0) WHERE {FENCE}",
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
            f" locked_by = NULL, locked_until = NULL, deliveries = 0 WHERE {FENCE}",
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
        """Rows due or waiting out a retry, and rows claimed by any consumer."""
        return await self._count("'available', 'running'")

    async def dead_letters(self) -> int:
        return await self._count("'dead'")

    async def close(self) -> None:
        if not self._open:
            return
        await self._stop_consuming()
        self._open = False
        self._inbox.put(None)  # after the writes already queued
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)


def sqlite_path(url: str) -> str:
    path = urlsplit(url).path
    if not path.startswith("/") or len(path) < 2:
        raise ConfigError(
            f"a SQLite URL names a file, as sqlite:///relative.db: {redact_url(url)!r}"
        )
    return path[1:]


async def open_sqlite(url: str, name: str) -> SQLiteQueue:
    _, settings = split_settings(url, Settings(poll=0.05))
    path = sqlite_path(url)
    if not Path(path).parent.is_dir():
        raise ConfigError(f"the folder of the SQLite database {path} does not exist")
    queue = SQLiteQueue(path, name, settings)
    try:
        await queue._start()
    except QueueError as exc:
        await queue.close()
        raise ServiceUnavailable(f"cannot open the SQLite database {path}: {exc}") from exc
    return queue
