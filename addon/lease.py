"""This sidecar's liveness, as PostgreSQL sees it: an advisory lock held for the life of the process.

Single flight across sidecars needs one fact: is the process that sent a pending step still alive?
A heartbeat row answers it late (a dead sidecar looks alive until its lease expires) and a clock
decides it. An advisory lock answers it at once: the sidecar holds `pg_advisory_lock(CLASS, id)` on
a connection of its own, and PostgreSQL drops the lock the moment that connection closes, SIGKILL
included. A pending step names its owner's id; `ALIVE` asks `pg_locks` whether that id is held.

The id is drawn at random and claimed with `pg_try_advisory_lock`, so two live sidecars never share
one. The lock needs a session connection (not a transaction-pooling PgBouncer). If the connection
breaks (PostgreSQL restarted), the sidecar takes the same id again as soon as it can; until then it
starts no new step (the journal answers 503).
"""

from __future__ import annotations

import asyncio
import logging
import secrets

import psycopg

logger = logging.getLogger("durable")

CLASS = 0x6475  # the advisory lock class of sidecar leases ("du")

# SQL: is the sidecar whose lease id is in column `owner` alive? (pg_locks holds every database's locks)
ALIVE = (
    "EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
    f" AND l.classid = {CLASS} AND l.objid = owner::oid"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()))"
)


class LeaseLost(RuntimeError):
    """This sidecar does not hold its lease right now: it must not start a step."""


class Lease:
    def __init__(self) -> None:
        self.id = 0  # 0: never held
        self._conn: psycopg.AsyncConnection | None = None
        self._lock = asyncio.Lock()
        self._watch: asyncio.Future[None] | None = None

    @property
    def held(self) -> bool:
        return self._conn is not None and not self._conn.closed and not self._conn.broken

    async def ensure(self, dsn: str, timeout_s: float) -> int:
        """The lease id, (re)taking the lock first if the connection that held it is gone."""
        if self.held:
            return self.id
        async with self._lock:
            if not self.held:
                await self._take(dsn, timeout_s)
        return self.id

    async def _take(self, dsn: str, timeout_s: float) -> None:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, connect_timeout=max(1, round(timeout_s)))
        for _ in range(100):
            candidate = self.id or secrets.randbelow(2**31 - 2) + 1
            row = await (await conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (CLASS, candidate))).fetchone()
            if row and row[0]:
                if self.id and candidate != self.id:
                    logger.warning("durable: lease %d could not be taken again; now %d", self.id, candidate)
                self.id, self._conn = candidate, conn
                self._watch = asyncio.ensure_future(self._watch_connection(conn))
                return
            if self.id:  # our old id is held by someone else: its previous session has not ended yet
                await asyncio.sleep(0.1)
        await conn.close()
        raise LeaseLost("could not take a sidecar lease")

    async def _watch_connection(self, conn: psycopg.AsyncConnection) -> None:
        """Notice at once when the lease's connection dies (the lock went with it)."""
        try:
            async for _ in conn.notifies():
                pass
        except psycopg.Error as e:
            logger.warning(
                "durable: lease %d lost with its connection (%s); taking it again on the next step", self.id, e
            )
        finally:
            if not conn.closed:
                await conn.close()

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
