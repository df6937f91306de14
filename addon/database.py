"""Where the journal lives: `durable_dsn`, else `DATABASE_URL`, else an embedded PostgreSQL.

The embedded server (embedded.py) keeps its data in `$DURABLE_HOME/pgdata` (default: the user's
data dir), so the journal survives restarts of the sidecar and of the machine.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import platformdirs
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from . import embedded


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
    """A new, empty database on the server behind `server_dsn` (for tests and benchmarks); its DSN."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_conninfo(server_dsn, dbname=name)


def drop_database(server_dsn: str, dsn: str) -> None:
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{conninfo_to_dict(dsn)["dbname"]}" WITH (FORCE)')
