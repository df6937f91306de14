"""The physical floor of a journaling proxy, for scripts/bench.py: an addon that does nothing but
the two commits the design needs per call (one before forwarding, one before answering), as
trivial INSERT and UPDATE statements on one dedicated connection. `--set floor_dsn=DSN`."""

from __future__ import annotations

import itertools
import os

import psycopg
from mitmproxy import ctx, http


class TwoCommits:
    def __init__(self) -> None:
        self.conn: psycopg.AsyncConnection | None = None
        self.ids = itertools.count(os.getpid() * 10**9)

    def load(self, loader) -> None:  # type: ignore[no-untyped-def]
        loader.add_option("floor_dsn", str, "", "PostgreSQL DSN for the floor's two commits per call")

    async def running(self) -> None:
        self.conn = await psycopg.AsyncConnection.connect(ctx.options.floor_dsn, autocommit=True)
        await self.conn.execute("CREATE TABLE IF NOT EXISTS bench_floor (id bigint PRIMARY KEY, request bytea, response bytea)")

    async def request(self, flow: http.HTTPFlow) -> None:
        assert self.conn is not None
        flow.metadata["floor_id"] = next(self.ids)
        await self.conn.execute("INSERT INTO bench_floor (id, request) VALUES (%s, %s)", (flow.metadata["floor_id"], flow.request.raw_content))

    async def response(self, flow: http.HTTPFlow) -> None:
        assert self.conn is not None and flow.response is not None
        await self.conn.execute("UPDATE bench_floor SET response = %s WHERE id = %s", (flow.response.raw_content, flow.metadata["floor_id"]))


addons = [TwoCommits()]
