"""The journal on a Citus cluster: what differs from one PostgreSQL, in one place.

A database whose `citus` extension is installed gets its journal distributed when the journal is
created (migrations.apply): `durable_runs` by `id` and `durable_steps` by `run_id`, co-located, so a
run's counter row and its steps share a shard on one worker, and `durable_record` is delegated to
that worker, where it runs as one local transaction. Everything that is not per run stays a plain
table on the coordinator: `durable_leases` (a lease's generation belongs where its advisory lock
lives: on the coordinator's sessions) and `durable_schema_version`.

Sidecars must connect to the coordinator: a lease is an advisory lock on the node its session is
connected to, and a take-over asks that node's `pg_locks` (lease.LIVE), so every sidecar's lock has
to be on one node. `check_node` refuses a worker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

# durable_record(p_run, ...) runs on the worker holding p_run's shard; the other functions the
# shards' columns and the pushed-down queries use are propagated as their dependencies
DISTRIBUTE = [
    "SELECT create_distributed_table('durable_runs', 'id')",
    "SELECT create_distributed_table('durable_steps', 'run_id', colocate_with => 'durable_runs')",
    "SELECT create_distributed_function('durable_try_jsonb(bytea, jsonb)')",
    "SELECT create_distributed_function('durable_record'::regproc::regprocedure, 'p_run',"
    " colocate_with => 'durable_runs')",
]


@dataclass(frozen=True)
class Cluster:
    workers: int  # nodes that hold shards
    shards: int  # shards of durable_steps (0: the journal is not distributed yet)


async def installed(conn: psycopg.AsyncConnection) -> bool:
    """Is this database a Citus one (the extension created in it)?"""
    cur = await conn.execute("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')")
    row = await cur.fetchone()
    return bool(row and row[0])


async def describe(conn: psycopg.AsyncConnection) -> Cluster:
    cur = await conn.execute(
        "SELECT (SELECT count(*) FROM pg_dist_node WHERE shouldhaveshards AND noderole = 'primary'"
        "        AND isactive),"
        "       (SELECT count(*) FROM pg_dist_shard WHERE logicalrelid = to_regclass('durable_steps'))"
    )
    row = await cur.fetchone()
    assert row is not None
    return Cluster(int(row[0]), int(row[1]))


async def distribute(conn: psycopg.AsyncConnection) -> None:
    """Distribute a journal just created (its tables still empty), inside the caller's transaction."""
    for statement in DISTRIBUTE:
        await conn.execute(statement)


async def check_node(conn: psycopg.AsyncConnection) -> None:
    """Refuse a Citus worker: leases must all be advisory locks on the coordinator (see above)."""
    cur = await conn.execute("SELECT citus_is_coordinator()")
    row = await cur.fetchone()
    if not (row and row[0]):
        raise NotCoordinator(
            "this database is a Citus worker: connect sidecars and commands to the coordinator, where "
            "every sidecar's lease (an advisory lock) must live for single flight to hold"
        )


class NotCoordinator(RuntimeError):
    """The journal's DSN names a Citus worker: the sidecar answers 503 with this reason, forwarding nothing."""


def _workers(server_dsn: str) -> tuple[list[tuple[str, int]], tuple[str, int] | None] | None:
    """The cluster behind a coordinator's DSN: its workers and its own entry (None: not a cluster)."""
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'citus'").fetchone() is None:
            return None
        nodes = conn.execute(
            "SELECT nodename, nodeport, groupid FROM pg_dist_node WHERE noderole = 'primary'"
        ).fetchall()
    workers = [(host, port) for host, port, group in nodes if group != 0]
    coordinator = next(((host, port) for host, port, group in nodes if group == 0), None)
    return (workers, coordinator) if workers else None


def _nodes(server_dsn: str, workers: list[tuple[str, int]]) -> list[str]:
    """The DSNs of the coordinator's maintenance database and of the same database on each worker."""
    return [server_dsn, *(make_conninfo(server_dsn, host=host, port=port) for host, port in workers)]


def node_dsns(dsn: str) -> list[str]:
    """The servers a database lives on: its own, then on a cluster each worker's (for benchmarks)."""
    cluster = _workers(dsn)
    return _nodes(dsn, cluster[0] if cluster else [])


def create_database(server_dsn: str, name: str) -> bool:
    """CREATE DATABASE `name` on a Citus cluster, when `server_dsn` is a coordinator with workers:
    Citus's metadata is per database, so the new one gets the extension on every node and the
    coordinator's list of nodes. False: not a cluster (the caller creates a plain database)."""
    cluster = _workers(server_dsn)
    if cluster is None:
        return False
    workers, coordinator = cluster
    for node in _nodes(server_dsn, workers):
        with psycopg.connect(node, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        with psycopg.connect(make_conninfo(node, dbname=name), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION citus")
    with psycopg.connect(make_conninfo(server_dsn, dbname=name), autocommit=True) as conn:
        if coordinator is not None:
            conn.execute("SELECT citus_set_coordinator_host(%s, %s)", coordinator)
        for worker in workers:
            conn.execute("SELECT citus_add_node(%s, %s)", worker)
    return True


def drop_database(server_dsn: str, dsn: str) -> bool:
    """DROP DATABASE on every node of a cluster; False: not a cluster (the caller drops it)."""
    cluster = _workers(server_dsn)
    if cluster is None:
        return False
    name = conninfo_to_dict(dsn)["dbname"]
    for node in _nodes(server_dsn, cluster[0]):
        for last in (False, False, False, False, True):
            try:
                with psycopg.connect(node, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                break
            except psycopg.errors.ObjectInUse:  # a session FORCE ended had not exited yet (Citus's daemon)
                if last:
                    raise
                time.sleep(1)
    return True
