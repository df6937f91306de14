"""The physical floor of a journaling proxy, for scripts/bench.py: an addon that does nothing but
the two commits the design needs per call (one before forwarding, one before answering), as
trivial INSERT and UPDATE statements on one dedicated connection. `--set floor_dsn=DSN`.

`--set floor_thread=true` runs the same statements on a dedicated thread with a synchronous psycopg
connection (libpq's waits release the GIL) and hands results back to the event loop: the design
performance round 2 proposed for moving the journal's I/O off mitmproxy's loop, measured beside the async one."""

from __future__ import annotations

import asyncio
import itertools
import os
import queue
import threading
from typing import Any

import psycopg
from mitmproxy import ctx, http

CREATE = "CREATE TABLE IF NOT EXISTS bench_floor (id bigint PRIMARY KEY, request bytea, response bytea)"
INSERT = "INSERT INTO bench_floor (id, request) VALUES (%s, %s)"
UPDATE = "UPDATE bench_floor SET response = %s WHERE id = %s"


class TwoCommits:
    def __init__(self) -> None:
        self.conn: psycopg.AsyncConnection | None = None
        self.jobs: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.ids = itertools.count(os.getpid() * 10**9)
        self.connecting = asyncio.Lock()

    def load(self, loader) -> None:  # type: ignore[no-untyped-def]
        loader.add_option("floor_dsn", str, "", "PostgreSQL DSN for the floor's two commits per call")
        loader.add_option("floor_thread", bool, False, "run the commits on a dedicated thread (sync psycopg)")

    def running(self) -> None:
        if ctx.options.floor_thread:  # jobs queued before it connects wait in the queue
            threading.Thread(target=self._worker, args=(ctx.options.floor_dsn,), daemon=True).start()

    def _worker(self, dsn: str) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(CREATE)
            while True:
                loop, future, sql, params = self.jobs.get()
                try:
                    conn.execute(sql, params)
                    loop.call_soon_threadsafe(future.set_result, None)
                except Exception as e:
                    loop.call_soon_threadsafe(future.set_exception, e)

    async def _commit(self, sql: str, params: tuple[Any, ...]) -> None:
        if not ctx.options.floor_thread:
            async with self.connecting:
                if self.conn is None:
                    self.conn = await psycopg.AsyncConnection.connect(ctx.options.floor_dsn, autocommit=True)
                    await self.conn.execute(CREATE)
            await self.conn.execute(sql, params)
            return
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.jobs.put((loop, future, sql, params))
        await future

    async def request(self, flow: http.HTTPFlow) -> None:
        flow.metadata["floor_id"] = next(self.ids)
        await self._commit(INSERT, (flow.metadata["floor_id"], flow.request.raw_content))

    async def response(self, flow: http.HTTPFlow) -> None:
        assert flow.response is not None
        await self._commit(UPDATE, (flow.response.raw_content, flow.metadata["floor_id"]))


addons = [TwoCommits()]
