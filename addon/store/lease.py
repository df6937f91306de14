"""This sidecar's liveness, as PostgreSQL sees it: an advisory lock held for the life of the process.

Single flight across sidecars needs one fact: is the process that sent a pending step still alive?
A heartbeat row answers it late (a dead sidecar looks alive until its lease expires) and a clock
decides it. An advisory lock answers it at once: the sidecar holds `pg_advisory_lock(CLASS, id)` on
a connection of its own, and PostgreSQL drops the lock the moment that connection closes, SIGKILL
included. A pending step names its owner's id; `LIVE` asks `pg_locks` whether that id is held.

The id is drawn at random and claimed with `pg_try_advisory_lock`, so two live sidecars never share
one. The lock needs a session connection (not a transaction-pooling PgBouncer).

A connection can also end while its sidecar lives: a pooler or managed database ends idle sessions,
an operator terminates a backend, a link breaks. So the lease's session turns the server's idle
timeouts off and asks `SELECT 1` every HEARTBEAT_S (a frozen link fails that within the deadline);
when the connection is lost the same id is taken again at once, and each take bumps the id's
`generation` in `durable_leases`. Another sidecar treats an owner as dead only once its lock has
been free for a grace period with the same generation (lifecycle.py), which a lost-and-re-taken
lease never shows: a blip shorter than the grace cannot give a step a second sender.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

import psycopg

from . import database

logger = logging.getLogger("durable")

CLASS = 0x6475  # the advisory lock class of sidecar leases ("du")
HEARTBEAT_S = 1.0  # how often the lease's connection is asked whether it still lives
RETAKE_S = 0.5  # how often a lost lease is tried again

# SQL: the ids of the sidecar leases held now, and the generation of lease %(lease)s. pg_locks is
# the locks of the node this session is connected to (every database's: narrowed to this one), so
# it is asked on its own, where the leases are, and its answer passed into the statements that
# need it: on a Citus cluster a statement on a run's steps runs on a worker, whose pg_locks holds
# none of the sidecars' leases (citus.py)
LIVE = (
    "SELECT coalesce(array_agg(l.objid::bigint), '{}') AS live,"
    " (SELECT generation FROM durable_leases WHERE id = %(lease)s) AS generation"
    f" FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.classid = {CLASS}"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


class LeaseLost(RuntimeError):
    """This sidecar does not hold its lease right now: it must not start a step."""


class Lease:
    def __init__(self) -> None:
        self.id = 0  # 0: never held
        self.generation = 0
        self._conn: psycopg.AsyncConnection | None = None
        self._lock = asyncio.Lock()
        self._keeper: asyncio.Future[None] | None = None
        self._dsn = ""
        self._timeout_s = 5.0

    @property
    def held(self) -> bool:
        return self._conn is not None and not self._conn.closed and not self._conn.broken

    async def ensure(self, dsn: str, timeout_s: float) -> int:
        """The lease id, (re)taking the lock first if the connection that held it is gone."""
        self._dsn, self._timeout_s = dsn, timeout_s
        if self.held:
            return self.id
        async with self._lock:
            if not self.held:
                await database.within(timeout_s + 1, self._take())
        return self.id

    async def _take(self) -> None:
        conn = await psycopg.AsyncConnection.connect(
            self._dsn, autocommit=True, **database.link_options(self._timeout_s)
        )
        try:
            await database.keep_session(conn, self._timeout_s)
            for _ in range(100):
                candidate = self.id or secrets.randbelow(2**31 - 2) + 1
                row = await (await conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (CLASS, candidate))).fetchone()
                if row and row[0]:
                    cur = await conn.execute(
                        "INSERT INTO durable_leases AS l (id) VALUES (%s) ON CONFLICT (id) DO UPDATE"
                        " SET generation = l.generation + 1, taken_at = now() RETURNING generation",
                        (candidate,),
                    )
                    generation = await cur.fetchone()
                    self.id, self.generation, self._conn = candidate, generation[0] if generation else 0, conn
                    if self._keeper is None or self._keeper.done():
                        self._keeper = asyncio.ensure_future(self._keep())
                    return
                if self.id:  # our old id is still held: the session that held it has not ended yet
                    await asyncio.sleep(0.1)
        except BaseException:
            await conn.close()
            raise
        await conn.close()
        raise LeaseLost(f"could not take lease {self.id} again: its old session still holds it")

    async def _keep(self) -> None:
        """Ask the lease's connection every HEARTBEAT_S whether it lives; when it does not, take the
        same id again at once (not on the next step: a quiet sidecar must not look dead for long)."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            conn = self._conn
            if conn is None:
                return  # closed
            try:
                await database.within(self._timeout_s, conn.execute("SELECT 1"))
                continue
            except (psycopg.Error, TimeoutError) as e:
                logger.warning("durable: lease %d lost with its connection (%s); taking it again", self.id, e)
            if self._conn is conn:
                self._conn = None
            asyncio.ensure_future(conn.close())  # in the background: a frozen link may hold it
            while self._conn is None and self._dsn:
                try:
                    async with self._lock:
                        if self._conn is None:
                            await database.within(self._timeout_s + 1, self._take())
                    logger.warning("durable: lease %d taken again (generation %d)", self.id, self.generation)
                    break
                except (psycopg.Error, TimeoutError, LeaseLost, OSError) as e:
                    logger.debug("durable: lease %d not taken again yet: %s", self.id, e)
                    await asyncio.sleep(RETAKE_S)

    async def close(self) -> None:
        """Give the lease up, deterministically: the keeper has stopped and the lock is released by the
        time this returns (a closed session's lock is dropped by the server a moment later)."""
        self._dsn = ""
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await database.within(
                    self._timeout_s, conn.execute("SELECT pg_advisory_unlock(%s, %s)", (CLASS, self.id))
                )
            except (psycopg.Error, TimeoutError):
                pass  # a broken connection: its lock goes with it
            await conn.close()
