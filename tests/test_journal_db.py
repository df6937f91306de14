"""The journal's database: the embedded default, failing closed when it is unreachable, a testcontainers
PostgreSQL, the hash-partitioned layout. Its statements, in process: test_journal_statements.py."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from durable_sidecar.store import database, embedded
from durable_sidecar.tools import launcher
from durable_sidecar.store.journal import Journal
from durable_sidecar.store.migrations import MIGRATIONS
from conftest import PaidApi, Sidecars, docker_reachable, new_run, on_citus, sql


def get(sidecar: launcher.Sidecar, url: str, run: str, attempt: str) -> requests.Response:
    proxy = f"http://{run}:{attempt}@127.0.0.1:{sidecar.port}"
    return requests.get(url, proxies={"http": proxy, "https": proxy}, timeout=30)


def test_embedded_postgres_is_the_default_and_survives_restarts(
    embedded_home: Path, confdir: Path, http_api: PaidApi
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["DURABLE_HOME"] = str(embedded_home)
    run = new_run()
    first = launcher.start_sidecar(confdir, {}, env=env)
    try:
        assert get(first, f"{http_api.url}/v1/search?q=embedded", run, "a1").headers["Durable-Outcome"] == "recorded"
        assert f"via embedded:{embedded_home / 'pgdata'}" in first.log()
    finally:
        first.stop()
    second = launcher.start_sidecar(confdir, {}, env=env)
    try:
        r = get(second, f"{http_api.url}/v1/search?q=embedded", run, "a2")
        assert r.headers["Durable-Outcome"] == "replayed" and r.json()["call"] == 1
    finally:
        second.stop()
    assert (embedded_home / "pgdata" / "PG_VERSION").exists()
    assert http_api.books()["calls"] == 1


@pytest.mark.parametrize("found_by", ["a statement", "the lease"])
def test_embedded_postgres_is_restarted_when_it_dies_and_stopped_after_a_crashed_sidecar(
    found_by: str, embedded_home: Path, confdir: Path, http_api: PaidApi
) -> None:
    home = embedded_home
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"} | {"DURABLE_HOME": str(home)}
    # the restart (crash recovery) fits the call's durable_db_timeout even on a loaded machine
    sidecar = launcher.start_sidecar(confdir, {"durable_db_timeout": "30000"}, env=env)
    run = new_run()
    try:
        assert get(sidecar, f"{http_api.url}/v1/search?q=one", run, "a1").headers["Durable-Outcome"] == "recorded"
        log = sidecar.log()
        assert log.count("embedded PostgreSQL started in") == 1 and "pg_ctl" not in log  # one line, not a dozen
        postmaster = int((home / "pgdata" / "postmaster.pid").read_text().split()[0])
        os.kill(postmaster, signal.SIGKILL)  # a zombie until this machine's init reaps it, which may take seconds
        if found_by == "the lease":  # the lease keeper saw its connection die: the call must take the lease again
            deadline = time.monotonic() + 30
            while "lost with its connection" not in sidecar.log() and time.monotonic() < deadline:
                time.sleep(0.05)
        again = get(sidecar, f"{http_api.url}/v1/search?q=two", run, "a1")  # the call that finds it dead
        assert again.headers["Durable-Outcome"] == "recorded", again.text  # revived and answered, not a 503
        assert "had stopped; started it again" in sidecar.log()
        status = json.loads(subprocess.run([str(Path(sys.executable).with_name("durable")), "db", "status", "--json"],
                                           env=env, capture_output=True, text=True, check=True).stdout)
        assert status["running"] and status["pid"] != postmaster and sidecar.process.pid in [u["pid"] for u in status["users"]]
        revived = status["pid"]
    finally:
        sidecar.kill()  # SIGKILL: no goodbye to the handle list
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and psutil.pid_exists(revived):
        time.sleep(0.2)
    assert not psutil.pid_exists(revived)  # the watcher stopped it: its last user is gone
    assert http_api.books()["calls"] == 2


def test_a_dead_unreaped_postmaster_is_dead_and_its_reaping_is_awaited(tmp_path: Path) -> None:
    """A killed postmaster stays a zombie until init reaps it: it answers kill(pid, 0), and its lock
    file stops any new server, so revive must neither take it for running nor start over it."""
    child = subprocess.Popen(["sleep", "60"])  # ours, so a zombie until we reap it, like an orphan under a slow init
    (tmp_path / "postmaster.pid").write_text(f"{child.pid}\n{tmp_path}\n")
    assert embedded._postmaster(tmp_path) == child.pid
    child.kill()
    while Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
        time.sleep(0.01)
    assert embedded._postmaster(tmp_path) is None  # dead, though kill(pid, 0) still answers
    assert not embedded._reaped(tmp_path, 0.2)  # not reaped: no new server yet
    threading.Timer(0.3, child.wait).start()
    assert embedded._reaped(tmp_path, 10)  # waits for the reaping, then the lock file is stale


def test_unreachable_database_fails_closed(sidecars: Sidecars, http_api: PaidApi) -> None:
    dead = f"postgresql://postgres@127.0.0.1:{launcher.free_port()}/nothing?connect_timeout=1"
    sidecar = sidecars.start(durable_dsn=dead, durable_db_timeout=1000, journal_required=False)
    r = requests.post(f"{http_api.url}/v1/payments", json={"amount": 9},
                      proxies={"http": f"http://{new_run()}:a1@127.0.0.1:{sidecar.port}"}, timeout=30)
    assert r.status_code == 503
    body = r.json()
    assert body["error"] == "durable-sidecar" and "journal unavailable" in body["reason"] and body["failed"]
    assert http_api.books()["calls"] == 0
    assert sidecar.process.poll() is None  # still up, waiting for its database
    for _ in range(3):
        requests.get(f"{http_api.url}/v1/search", proxies={"http": f"http://{new_run()}:a1@127.0.0.1:{sidecar.port}"},
                     timeout=30)
    assert sidecar.log().count("error connecting in") == 1  # once per 30 s, not once per reconnect


def test_an_embedded_journal_that_cannot_start_fails_closed_and_says_why(
    sidecars: Sidecars, http_api: PaidApi, embedded_home: Path
) -> None:
    """No database found at all (the data folder is a file): the sidecar stays up and answers 503s
    that name the failure, as with an unreachable DSN, and starts the server once it can."""
    (embedded_home / "pgdata").write_text("not a folder")
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"} | {"DURABLE_HOME": str(embedded_home)}
    sidecar = sidecars.start(env=env, durable_dsn="", journal_required=False)
    for _ in range(2):  # the second call tries again: nothing is cached from the first failure
        r = get(sidecar, f"{http_api.url}/v1/search?q=nowhere", new_run(), "a1")
        assert r.status_code == 503 and "journal unavailable" in r.json()["reason"], r.text
        assert "embedded PostgreSQL" in r.json()["failed"] and "initdb exited with 1" in r.json()["failed"], sidecar.log()
    assert http_api.books()["calls"] == 0 and sidecar.process.poll() is None
    assert "Not a directory" in sidecar.log()  # initdb's own words, kept in the log
    (embedded_home / "pgdata").unlink()  # the operator fixes it: the next call starts the server
    r = get(sidecar, f"{http_api.url}/v1/search?q=somewhere", new_run(), "a1")
    assert r.headers["Durable-Outcome"] == "recorded", r.text


@pytest.mark.skipif(not docker_reachable(), reason="no Docker engine answers: testcontainers cannot start Postgres here")
def test_journal_on_a_testcontainers_postgres() -> None:
    from testcontainers.postgres import PostgresContainer

    with PostgresContainer("postgres:16-alpine", driver=None) as pg:
        dsn = pg.get_connection_url()

        async def roundtrip() -> list:
            journal = Journal(dsn)
            await journal.open()
            found = await journal.has_steps("nobody")
            await journal.close()
            return found

        assert asyncio.run(roundtrip()) is False
        assert sql(dsn, "SELECT version FROM durable_schema_version ORDER BY 1") == [(v,) for v, _ in MIGRATIONS]


def test_the_journal_can_be_created_hash_partitioned_by_run(
    pg_server: str, sidecars: Sidecars, http_api: PaidApi
) -> None:
    """`durable db init --partitions N` creates durable_steps as N hash partitions by run; sidecars
    journal into it as usual (CI runs the journal's tests against this layout too:
    DURABLE_TEST_PARTITIONS), and a journal's layout is never changed behind its back."""
    if on_citus(pg_server):
        pytest.skip("hash partitions are for one PostgreSQL; test_citus.py checks the distributed layout")
    dsn = database.create_database(pg_server, "durable_test")
    durable = str(Path(sys.executable).with_name("durable"))
    try:
        made = subprocess.run([durable, "db", "init", "--partitions", "4", "--dsn", dsn, "--json"],
                              capture_output=True, text=True, check=True)
        assert json.loads(made.stdout)["partitions"] == 4 and json.loads(made.stdout)["applied"][0] == 1
        assert sql(dsn, "SELECT relkind FROM pg_class WHERE relname = 'durable_steps'") == [("p",)]
        status = subprocess.run([durable, "db", "status", "--dsn", dsn], capture_output=True, text=True, check=True)
        assert "durable_steps is hash-partitioned by run into 4 tables" in status.stdout
        sidecar = sidecars.start(durable_dsn=dsn)
        runs = [new_run() for _ in range(8)]
        for run in runs:
            assert get(sidecar, f"{http_api.url}/v1/search?q=p", run, "a1").headers["Durable-Outcome"] == "recorded"
            assert get(sidecar, f"{http_api.url}/v1/search?q=p", run, "a2").headers["Durable-Outcome"] == "replayed"
        homes = sql(dsn, "SELECT DISTINCT tableoid::regclass::text FROM durable_steps WHERE run_id = ANY(%s)", runs)
        assert len(homes) > 1 and all(home.startswith("durable_steps_p") for (home,) in homes)
        again = subprocess.run([durable, "db", "init", "--partitions", "8", "--dsn", dsn], capture_output=True, text=True)
        assert again.returncode == 1 and "already exists (hash-partitioned by run into 4 tables), not partitioned into 8" in again.stderr
        plain = database.create_database(pg_server, "durable_test")
        try:
            subprocess.run([durable, "db", "init", "--dsn", plain], check=True, capture_output=True)
            refused = subprocess.run([durable, "db", "init", "--partitions", "4", "--dsn", plain],
                                     capture_output=True, text=True)
            assert refused.returncode == 1 and "already exists (one table)" in refused.stderr
        finally:
            database.drop_database(pg_server, plain)
    finally:
        sidecars.close()
        database.drop_database(pg_server, dsn)


def test_the_suites_journal_has_the_layout_ci_asked_for(sidecars: Sidecars, http_api: PaidApi, pg_dsn: str) -> None:
    """CI reruns the journal's suites on hash partitions and on a Citus cluster: this says they ran
    on that layout, not on a plain table by mistake (the journal a sidecar created on first start)."""
    sidecar = sidecars.start()
    assert get(sidecar, f"{http_api.url}/v1/search?q=layout", new_run(), "a1").status_code == 200
    if on_citus(pg_dsn):
        assert sql(pg_dsn, "SELECT table_name::text, distribution_column FROM citus_tables ORDER BY 1") == [
            ("durable_runs", "id"), ("durable_steps", "run_id")]
        assert sql(pg_dsn, "SELECT count(DISTINCT nodeport) FROM citus_shards")[0][0] >= 2
    else:
        partitions = int(os.environ.get("DURABLE_TEST_PARTITIONS") or 0)
        assert sql(pg_dsn, "SELECT count(*) FROM pg_inherits WHERE inhparent = 'durable_steps'::regclass") == [
            (partitions,)]


def test_migrations_after_12_are_lists_of_single_statements() -> None:
    """Citus refuses DDL that reaches a worker as a string of several statements, so every migration
    a distributed journal may receive is a list of single ones (store/migrations.py)."""
    from durable_sidecar.store.migrations import single_statements

    assert single_statements("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1; $$;")
    assert single_statements("COMMENT ON TABLE t IS 'a; b'")
    assert not single_statements("ALTER TABLE t ADD COLUMN x int; CREATE INDEX i ON t (x)")
    later = [(version, sql) for version, sql in MIGRATIONS if version > 12]
    assert all(isinstance(sql, list) and all(single_statements(s) for s in sql) for _, sql in later), later
