"""How the journal's statements reach PostgreSQL: one path for all of them, with a deadline, group
commit and a reconnect.

Connections come from a psycopg async pool opened lazily, so a sidecar whose database is down at
start (or goes away later) keeps running, answers 503 meanwhile, and serves again once it is back.
The statements themselves, and what they mean, are journal.py's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from . import database, embedded, lease, migrations

logger = logging.getLogger(__name__)
T = TypeVar("T")


class JournalError(RuntimeError):
    """The journal could not be read or written; the sidecar fails closed."""


class JournalTimeout(JournalError):
    """A statement got no answer within durable_db_timeout (a frozen link): its outcome is unknown."""


@dataclass
class Statement:
    what: str  # for errors and metrics
    sql: str
    params: Any
    fetch: str = "none"  # none (row count) | one | all
    run: str = ""  # the run a write belongs to: a batch's order
    retried: bool = False  # ran again on a fresh connection: its first try may have committed
    binary: bool = False  # results in binary: a bytea arrives as its bytes, not as hex text twice its size


async def _cursor(conn: psycopg.AsyncConnection, s: Statement) -> Any:
    return await conn.cursor(row_factory=dict_row).execute(s.sql, s.params, binary=s.binary)


async def _fetch(cursor: Any, fetch: str) -> Any:
    if fetch == "one":
        return await cursor.fetchone()
    if fetch == "all":
        return await cursor.fetchall()
    return cursor.rowcount


WRITERS = 2  # batches of writes in flight at once; further writes queue into the next batch
MAX_BATCH = 64


class Executor:
    """Runs statements: each on a pooled connection in its own transaction, or writes of several
    agents batched into one (group commit); each within durable_db_timeout; once more on a fresh
    connection when the first turns out dead. A statement outside it would have no deadline and no
    retry. Also owns this sidecar's lease, which needs the same DSN and deadline."""

    def __init__(self, dsn: str | None, timeout_s: float, max_connections: int, deadlines: bool) -> None:
        self._option_dsn = dsn
        self._timeout_s = timeout_s
        # every statement answers within timeout_s (the agent's path), or none is bounded (operators'
        # bulk work: imports, exports); connecting is always bounded
        self._deadline_s: float | None = timeout_s if deadlines else None
        self._max_connections = max_connections
        self._pool: AsyncConnectionPool | None = None
        self._migrated = False
        self._lock = asyncio.Lock()
        self._reviving = asyncio.Lock()
        self.observe: Callable[[str, float, bool], None] = lambda what, seconds, ok: None  # metrics hook
        self.on_commit: Callable[[int], None] = lambda writes: None  # metrics hook: writes per group commit
        self._batches: set[asyncio.Future[None]] = set()  # batches of writes in flight
        self._queued: list[tuple[Statement, asyncio.Future[Any]]] = []
        self.target: database.Target | None = None
        self.lease = lease.Lease()

    async def open(self) -> None:
        """Find the database (starting the embedded one if needed), open the pool, migrate."""
        async with self._lock:
            if self._pool is None:
                self.target = await asyncio.to_thread(database.resolve, self._option_dsn)
                logger.info(
                    "durable: journal in PostgreSQL via %s (%s)",
                    self.target.origin,
                    database.describe(self.target.dsn),
                )
                self._pool = AsyncConnectionPool(
                    self.target.dsn,
                    min_size=1,
                    max_size=self._max_connections,
                    kwargs={"autocommit": True, **database.link_options(self._timeout_s)},
                    configure=self._configure,
                    timeout=self._timeout_s,
                    open=False,
                )
                await self._pool.open(wait=False)
            if not self._migrated:
                async with self._pool.connection() as conn:
                    applied = await migrations.apply(conn)
                if applied:
                    logger.info("durable: applied journal migrations %s", applied)
                self._migrated = True

    async def _configure(self, conn: psycopg.AsyncConnection) -> None:
        if self._deadline_s is not None:
            await database.keep_session(conn, self._deadline_s)

    async def _within(self, work: Awaitable[T]) -> T:
        if self._deadline_s is None:
            return await work
        try:
            return await database.within(self._deadline_s, work)
        except TimeoutError as e:
            raise JournalTimeout(f"no answer from the journal within durable_db_timeout ({e})") from e

    async def ping(self) -> None:
        """One round trip on a pooled connection: does the journal answer now?"""
        await self._run("ping", "SELECT 1", ())

    async def owner(self) -> int:
        """This sidecar's lease id, which every step it sends carries; the lease is (re)taken if needed."""
        for last in (False, True):
            try:
                if self.target is None or not self._migrated:
                    await self.open()
                assert self.target is not None
                return await self.lease.ensure(self.target.dsn, self._timeout_s)
            except Exception as e:
                if not last and await self._revive():
                    continue
                self.observe("take lease", 0.0, False)
                raise JournalError(f"take lease: {type(e).__name__}: {e}".strip()) from e
        raise AssertionError("unreachable: the last try returns or raises")

    async def close(self) -> None:
        await self.lease.close()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _run(self, what: str, sql: str, params: Any, fetch: str = "none", binary: bool = False) -> Any:
        """One statement on a pooled connection, in its own transaction (autocommit)."""
        return (await self._execute([Statement(what, sql, params, fetch, binary=binary)]))[0]

    async def _execute(self, batch: list[Statement]) -> list[Any]:
        """Statements on one pooled connection: one alone in its own transaction (autocommit), several
        pipelined in ONE transaction, so they cost one round trip and one commit, all or none."""
        tries: list[psycopg.AsyncConnection] = []

        async def execute(conn: psycopg.AsyncConnection) -> list[Any]:
            if tries:  # a second run after a broken connection: the first's outcome is unknown
                for s in batch:
                    s.retried = True
            tries.append(conn)
            if len(batch) == 1:
                cursors = [await _cursor(conn, batch[0])]
            else:
                cursors = []
                async with conn.pipeline(), conn.transaction():
                    for s in batch:
                        cursors.append(await _cursor(conn, s))
            return [await _fetch(cur, s.fetch) for cur, s in zip(cursors, batch, strict=True)]

        return await self._on_connection([s.what for s in batch], execute)

    async def _on_connection(self, whats: list[str], work: Callable[[psycopg.AsyncConnection], Awaitable[T]]) -> T:
        """`work` on one pooled connection, timed as each of `whats`; any failure is a JournalError.

        Connections are not pinged on checkout (that would double the round trips). When one turns
        out dead (Postgres restarted), the idle ones are checked and `work` runs once more on a
        fresh connection: safe, because every statement here is idempotent or, for a new step,
        guarded by the (run, fingerprint, occurrence) key.
        """
        try:
            return await self._on_connection_once(whats, work)
        except JournalTimeout:
            raise  # the deadline is spent: no second try
        except JournalError:
            if await self._revive():
                return await self._on_connection_once(whats, work)
            raise

    async def _revive(self) -> bool:
        """On the embedded database, a server that died under this sidecar is started again."""
        if self.target is None or not self.target.origin.startswith("embedded:"):
            return False
        async with self._reviving:  # one at a time: the embedded server's file lock is per process
            pgdata = Path(self.target.origin.removeprefix("embedded:"))
            return await asyncio.to_thread(embedded.revive, pgdata, self._timeout_s)

    async def _on_connection_once(self, whats: list[str], work: Callable[[psycopg.AsyncConnection], Awaitable[T]]) -> T:
        what = whats[0] if len(whats) == 1 else f"{len(whats)} journal writes"
        try:
            if self._pool is None or not self._migrated:
                await self.open()
            assert self._pool is not None
            started = time.perf_counter()
            for retry in (False, True):
                async with self._pool.connection() as conn:
                    try:
                        result = await self._within(work(conn))
                    except JournalTimeout:
                        await conn.close()  # stuck mid-statement: the pool discards it and makes another
                        raise
                    except psycopg.OperationalError:
                        if retry or not conn.broken:
                            raise
                        await self._revive()
                        await self._pool.check()
                        continue
                    elapsed = time.perf_counter() - started
                    for each in whats:
                        self.observe(each, elapsed, True)
                    return result
            raise AssertionError("unreachable: the retry returns or raises")
        except JournalTimeout:
            self.observe(what, 0.0, False)
            raise
        except Exception as e:  # psycopg, pool timeouts, embedded start: all mean "journal unavailable"
            self.observe(what, 0.0, False)
            raise JournalError(f"{what}: {type(e).__name__}: {e}".strip()) from e

    async def _write(self, what: str, run: str, sql: str, params: Any, fetch: str = "none") -> Any:
        """A write on an agent's path. Alone, it goes at once (a batch of one). While WRITERS batches
        are in flight, new writes queue and then go together in one transaction: group commit, so 32
        agents recording at once cost a few commits per round trip instead of 32.

        A batch is ordered by run (stable: a run's writes keep their order), so two batches always
        take the runs' row locks in the same order and cannot deadlock.
        """
        return await self._write_statement(Statement(what, sql, params, fetch, run))

    async def _write_statement(self, statement: Statement) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued.append((statement, future))
        self._next_batch()
        return await self._within(asyncio.shield(future))  # queued behind stuck batches: still on time

    def _next_batch(self) -> None:
        if self._queued and len(self._batches) < WRITERS:
            batch, self._queued = self._queued[:MAX_BATCH], self._queued[MAX_BATCH:]
            batch.sort(key=lambda queued: queued[0].run)
            task = asyncio.ensure_future(self._write_batch(batch))
            self._batches.add(task)  # the loop holds tasks weakly
            task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Future[None]) -> None:
        self._batches.discard(task)
        self._next_batch()

    async def _write_batch(self, batch: list[tuple[Statement, asyncio.Future[Any]]]) -> None:
        try:
            results = await self._execute([statement for statement, _ in batch])
            self.on_commit(len(batch))
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():  # the agent may have hung up meanwhile
                    future.set_result(result)
        except JournalError as e:
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
