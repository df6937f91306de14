"""Where the journal lives: `durable_dsn`, else `DATABASE_URL`, else an embedded PostgreSQL.

The embedded server (embedded.py) keeps its data in `$DURABLE_HOME/pgdata` (default: the user's
data dir), so the journal survives restarts of the sidecar and of the machine.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from . import citus, embedded


@dataclass(frozen=True)
class Target:
    dsn: str
    origin: str  # "durable_dsn" | "DATABASE_URL" | "embedded:<pgdata>"


def durable_home() -> Path:
    return Path(os.environ.get("DURABLE_HOME") or platformdirs.user_data_path("durable-sidecar"))


def resolve(option_dsn: str | None) -> Target:
    if option_dsn:
        return Target(option_dsn, "durable_dsn")
    if os.environ.get("DATABASE_URL"):
        return Target(os.environ["DATABASE_URL"], "DATABASE_URL")
    return Target(embedded.start(durable_home()), f"embedded:{durable_home() / 'pgdata'}")


def describe(dsn: str) -> str:
    """The DSN without its password, for logs."""
    try:
        parts = conninfo_to_dict(dsn)
    except Exception:
        return "<unparseable dsn>"
    parts.pop("password", None)
    return " ".join(f"{k}={v}" for k, v in sorted(parts.items()))


def create_database(server_dsn: str, prefix: str) -> str:
    """A new, empty database on the server behind `server_dsn` (for tests and benchmarks); its DSN.
    On a Citus coordinator, a Citus database on every node of its cluster."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    if not citus.create_database(server_dsn, name):
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    return make_conninfo(server_dsn, dbname=name)


def drop_database(server_dsn: str, dsn: str) -> None:
    if not citus.drop_database(server_dsn, dsn):
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{conninfo_to_dict(dsn)["dbname"]}" WITH (FORCE)')


# -- connections that notice a broken link -------------------------------------------------------


def link_options(timeout_s: float) -> dict[str, Any]:
    """libpq options for every journal connection: TCP keepalives (a dead peer is noticed in about
    10 s even when nothing is being sent) and a bound on unacknowledged data (a link that takes
    bytes and never acknowledges them), besides the connect timeout."""
    return {
        "connect_timeout": max(2, round(timeout_s)),
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
        "tcp_user_timeout": max(1000, round(timeout_s * 1000) * 2),
    }


async def keep_session(conn: psycopg.AsyncConnection, timeout_s: float) -> None:
    """The server's own deadline on every statement (statement_timeout, a little past the client's,
    which gives up first), and none of the idle timeouts a managed PostgreSQL may set: they would end
    the lease's session, or a pooled one, while the sidecar is merely quiet."""
    settings = {"statement_timeout": f"{round(timeout_s * 1000) + 1000}ms", "idle_in_transaction_session_timeout": "0"}
    if conn.info.server_version >= 140000:
        settings["idle_session_timeout"] = "0"
    query = "SELECT " + ", ".join("set_config(%s, %s, false)" for _ in settings)
    await conn.execute(query, [v for pair in settings.items() for v in pair])


async def within[T](seconds: float, work: Awaitable[T]) -> T:
    """`work`, or TimeoutError after `seconds`, at once: unlike asyncio.wait_for, this does not wait
    for the cancelled work to unwind (psycopg then cancels the query on the server, which on a
    frozen link takes its own timeouts), so an agent is answered on time whatever the link does."""
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        task.add_done_callback(_quietly)
        raise TimeoutError(f"no answer within {seconds:g} s")
    return task.result()


def _quietly(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a late failure of abandoned work is not logged as unhandled
