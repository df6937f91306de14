"""The journal distributed on a Citus cluster of this module's own (tests/citus_cluster.py): its
layout, single flight across two sidecars, a worker stopped mid-run, the coordinator restarted.

CI also runs the journal's suites against a cluster (DATABASE_URL naming its coordinator: .ci/run);
here the cluster is this module's, so stopping its nodes disturbs no other test. Skipped, saying
why, where Citus is not installed in the machine's PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import requests

import citus_cluster
from conftest import PaidApi, Sidecars, fleet_benchmark, new_run, sql
from durable_sidecar.store import database, migrations
from durable_sidecar.store.lease import CLASS
from durable_sidecar.tools import launcher

MISSING = citus_cluster.missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"no Citus cluster: {MISSING}")
DURABLE = str(Path(sys.executable).with_name("durable"))
# the leases held now, with their generations
HELD_LEASES = (
    "SELECT id, generation FROM durable_leases WHERE id IN (SELECT objid::int FROM pg_locks"
    f" WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid = {CLASS})"
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[citus_cluster.Cluster]:
    base = Path(tempfile.mkdtemp(prefix="durable-citus-"))
    nodes = citus_cluster.Cluster(base)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def on_cluster(confdir: Path, cluster: citus_cluster.Cluster, _https_api: PaidApi) -> Iterator[Sidecars]:
    """Sidecars whose journal is the cluster's coordinator (its `postgres` database)."""
    group = Sidecars(confdir, cluster.dsn, _https_api.ca)
    yield group
    group.close()


def via(sidecar: launcher.Sidecar, run: str, attempt: str) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.proxies = {"http": sidecar.proxy_url(run, attempt)}
    return session


def worker_of(dsn: str, run: str) -> int:
    """The port of the worker that holds `run`'s shard of durable_steps."""
    return sql(
        dsn,
        "SELECT nodeport FROM citus_shards WHERE table_name = 'durable_steps'::regclass"
        " AND shardid = get_shard_id_for_distribution_column('durable_steps', %s::text)",
        run,
    )[0][0]


def runs_on(dsn: str, port: int, count: int = 1) -> list[str]:
    runs: list[str] = []
    while len(runs) < count:
        if worker_of(dsn, run := new_run()) == port:
            runs.append(run)
    return runs


def test_the_journal_is_distributed_by_run_and_a_runs_steps_live_on_one_worker(
    cluster: citus_cluster.Cluster, on_cluster: Sidecars, http_api: PaidApi
) -> None:
    """`durable db init` on a coordinator distributes the journal: runs and steps by run id,
    co-located, durable_record delegated by its run, leases and schema versions kept on the
    coordinator. Each run's steps are found, by a query of every shard, in one shard on one worker,
    and the runs of this test on both workers."""
    made = subprocess.run([DURABLE, "db", "init", "--dsn", cluster.dsn, "--json"],
                          capture_output=True, text=True, check=True)
    layout = json.loads(made.stdout)
    assert (layout["workers"], layout["partitions"], layout["shards"] > 0) == (2, 0, True), layout
    assert layout["layout"] == f"distributed by run over {layout['shards']} shards on 2 Citus workers"
    tables = sql(cluster.dsn, "SELECT table_name::text, citus_table_type, distribution_column, colocation_id"
                              " FROM citus_tables ORDER BY 1")
    assert [row[:3] for row in tables] == [("durable_runs", "distributed", "id"),
                                           ("durable_steps", "distributed", "run_id")]
    assert tables[0][3] == tables[1][3]  # co-located
    assert sql(cluster.dsn, "SELECT distribution_argument_index, colocationid FROM pg_dist_object"
                            " WHERE objid = 'durable_record'::regproc") == [(0, tables[0][3])]
    status = subprocess.run([DURABLE, "db", "status", "--dsn", cluster.dsn], capture_output=True, text=True, check=True)
    assert f"durable_steps is {layout['layout']}" in status.stdout
    partitioned = subprocess.run([DURABLE, "db", "init", "--partitions", "4", "--dsn", cluster.dsn],
                                 capture_output=True, text=True)
    assert partitioned.returncode == 1 and "already exists (distributed by run" in partitioned.stderr

    sidecar = on_cluster.start()
    runs = [new_run() for _ in range(16)]
    for run in runs:
        for q in ("a", "b", "c"):
            assert via(sidecar, run, "a1").get(f"{http_api.url}/v1/search?q={q}").headers["Durable-Outcome"] == "recorded"
    for run in runs:
        for q in ("a", "b", "c"):
            assert via(sidecar, run, "a2").get(f"{http_api.url}/v1/search?q={q}").headers["Durable-Outcome"] == "replayed"
    assert http_api.books()["charges"] == 48
    shards = sql(cluster.dsn, "SELECT s.nodeport, r.result FROM run_command_on_shards('durable_steps',"
                              " $$SELECT coalesce(json_object_agg(run_id, n), '{}') FROM"
                              " (SELECT run_id, count(*) AS n FROM %%s GROUP BY run_id) c$$) r"
                              " JOIN citus_shards s USING (shardid)")
    homes: dict[str, list[tuple[int, int]]] = {}
    for port, result in shards:
        for run, steps in json.loads(result).items():
            homes.setdefault(run, []).append((port, steps))
    assert all(len(homes[run]) == 1 and homes[run][0][1] == 3 for run in runs), homes
    assert {homes[run][0][0] for run in runs} == set(cluster.ports[1:])  # both workers, not the coordinator


def test_a_sidecars_first_start_distributes_the_journal_and_later_migrations_reach_every_shard(
    cluster: citus_cluster.Cluster, on_cluster: Sidecars, http_api: PaidApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No `durable db init`: the first sidecar on an empty Citus database creates the journal
    distributed. A migration after that (a column and an index, as a future version would add) is
    applied on the coordinator and reaches every shard on the workers."""
    dsn = database.create_database(cluster.dsn, "durable_citus")
    try:
        sidecar = on_cluster.start(durable_dsn=dsn)
        run = new_run()
        assert via(sidecar, run, "a1").get(f"{http_api.url}/v1/search?q=first").headers["Durable-Outcome"] == "recorded"
        sidecar.stop()
        assert sql(dsn, "SELECT table_name::text, distribution_column FROM citus_tables ORDER BY 1") == [
            ("durable_runs", "id"), ("durable_steps", "run_id")]
        later = (len(migrations.MIGRATIONS) + 1, ["ALTER TABLE durable_steps ADD COLUMN later integer",
                                                  "CREATE INDEX durable_steps_later ON durable_steps (run_id, later)"])
        monkeypatch.setattr(migrations, "MIGRATIONS", [*migrations.MIGRATIONS, later])

        async def migrate() -> list[int]:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                return await migrations.apply(conn)

        assert asyncio.run(migrate()) == [later[0]]
        shards = sql(dsn, "SELECT result FROM run_command_on_shards('durable_steps', $$SELECT count(*) FROM"
                          " pg_attribute a JOIN pg_index i ON i.indrelid = a.attrelid AND a.attnum = ANY(i.indkey)"
                          " WHERE a.attrelid = '%%s'::regclass AND a.attname = 'later'$$)")
        assert len(shards) > 1 and all(count == "1" for (count,) in shards), shards  # the column, indexed
        assert via(on_cluster.start(durable_dsn=dsn), run, "a2").get(
            f"{http_api.url}/v1/search?q=first").headers["Durable-Outcome"] == "replayed"
    finally:
        on_cluster.close()
        database.drop_database(cluster.dsn, dsn)


def test_a_sidecar_pointed_at_a_worker_forwards_nothing_and_says_why(
    cluster: citus_cluster.Cluster, on_cluster: Sidecars, http_api: PaidApi
) -> None:
    """Its lease would be an advisory lock on that worker, where no other sidecar looks: single
    flight would not hold. So every call is answered 503 with the reason, and none goes upstream."""
    sidecar = on_cluster.start(durable_dsn=cluster.node_dsn(cluster.ports[1]), journal_required=False)
    refused = via(sidecar, new_run(), "a1").post(f"{http_api.url}/v1/generate", json={"p": 1})
    assert refused.status_code == 503 and "this database is a Citus worker" in refused.json()["failed"], refused.text
    assert http_api.books()["calls"] == 0


def test_two_sidecars_keep_single_flight_on_a_key_ignoring_upstream(
    cluster: citus_cluster.Cluster, on_cluster: Sidecars, http_api: PaidApi
) -> None:
    """Sidecar A sends a 5 s generation (an upstream that ignores Idempotency-Key); the agent's
    second attempt asks sidecar B for the same step 0.5 s later. A's lease is an advisory lock on
    the coordinator, and B must find it there, not on the worker that runs the statement on the
    step: B waits for A's answer and replays it, past its 2 s lease grace. One charge."""
    a, b = on_cluster.start(), on_cluster.start()
    run = new_run()
    url = f"{http_api.url}/v1/generate?delay_ms=5000"
    answers: dict[str, requests.Response] = {}
    first = threading.Thread(target=lambda: answers.setdefault("a", via(a, run, "a1").post(url, json={"p": 1})))
    first.start()
    time.sleep(0.5)
    answers["b"] = via(b, run, "a2").post(url, json={"p": 1})
    first.join()
    assert answers["a"].status_code == 200 and answers["a"].headers["Durable-Outcome"] == "recorded"
    assert answers["b"].headers["Durable-Outcome"] == "replayed" and answers["b"].content == answers["a"].content
    assert http_api.books()["charges"] == 1


def test_a_worker_stopped_mid_run_refuses_its_runs_loses_nothing_and_they_resume(
    cluster: citus_cluster.Cluster, on_cluster: Sidecars, http_api: PaidApi
) -> None:
    """Worker 1 crashes (pg_ctl -m immediate) while a generation of a run on it is in flight. That
    answer is held and journaled when the worker is back; the run's new calls meanwhile answer 503
    and reach no upstream; a run on worker 2 carries on. Afterwards each run replays whole, and
    every call was charged once."""
    sidecar = on_cluster.start(durable_db_timeout=2000)
    down, up = cluster.ports[1], cluster.ports[2]
    (on_down,), (on_up,) = runs_on(cluster.dsn, down), runs_on(cluster.dsn, up)
    generate = f"{http_api.url}/v1/generate"
    for run in (on_down, on_up):
        assert via(sidecar, run, "a1").post(generate, json={"step": 1}).status_code == 200
    in_flight: dict[str, requests.Response] = {}
    thread = threading.Thread(target=lambda: in_flight.setdefault(
        "r", via(sidecar, on_down, "a1").post(f"{generate}?delay_ms=3000", json={"step": 2})))
    thread.start()
    time.sleep(1.0)  # recorded (pending on worker 1) and forwarded
    cluster.stop_node(down, "immediate")
    try:
        thread.join()
        assert in_flight["r"].status_code == 503 and "holds the answer" in in_flight["r"].json()["reason"]
        charged = http_api.books()["charges"]
        refused = via(sidecar, on_down, "a1").post(generate, json={"step": 3})
        assert refused.status_code == 503 and "journal unavailable" in refused.json()["reason"]
        assert http_api.books()["charges"] == charged  # nothing forwarded for the run on the stopped worker
        carried = via(sidecar, on_up, "a1").post(generate, json={"step": 2})
        assert carried.status_code == 200 and carried.headers["Durable-Outcome"] == "recorded"
    finally:
        cluster.start_node(down)
    deadline = time.monotonic() + 30
    while (held := via(sidecar, on_down, "a1").post(f"{generate}?delay_ms=3000", json={"step": 2})).status_code == 503:
        assert time.monotonic() < deadline, held.text
        time.sleep(0.5)
    assert held.headers["Durable-Outcome"] == "replayed"  # the held answer, journaled once the worker was back
    assert via(sidecar, on_down, "a1").post(generate, json={"step": 3}).headers["Durable-Outcome"] == "recorded"
    assert http_api.books()["charges"] == 5  # 2 + 1 on the stopped worker's run, 2 on the other: once each
    for run, steps in ((on_down, 3), (on_up, 2)):
        agent = via(sidecar, run, "a2")
        for step in range(1, steps + 1):
            url = f"{generate}?delay_ms=3000" if (run, step) == (on_down, 2) else generate
            assert agent.post(url, json={"step": step}).headers["Durable-Outcome"] == "replayed"
    assert http_api.books()["charges"] == 5


def test_the_coordinator_restarted_every_sidecar_retakes_its_lease_and_nothing_is_charged_twice(
    cluster: citus_cluster.Cluster, on_cluster: Sidecars, http_api: PaidApi
) -> None:
    """The coordinator restarts while each of two sidecars has a generation in flight: every session
    (the leases' and the pools') is gone. Both answers are held and journaled when it is back, both
    leases are taken again (a new generation each), and the runs go on with one charge per call."""
    sidecars = [on_cluster.start(durable_db_timeout=2000), on_cluster.start(durable_db_timeout=2000)]
    runs = [new_run(), new_run()]
    generate = f"{http_api.url}/v1/generate"
    for sidecar, run in zip(sidecars, runs, strict=True):
        assert via(sidecar, run, "a1").post(generate, json={"step": 1}).status_code == 200
    leases = dict(sql(cluster.dsn, HELD_LEASES))
    assert len(leases) == 2
    answers: dict[int, requests.Response] = {}
    threads = [
        threading.Thread(target=lambda i=i: answers.setdefault(
            i, via(sidecars[i], runs[i], "a1").post(f"{generate}?delay_ms=3000", json={"step": 2})))
        for i in (0, 1)
    ]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # both recorded and forwarded
    cluster.stop_node(cluster.ports[0], "immediate")
    time.sleep(3.0)  # both answers arrive while it is down
    cluster.start_node(cluster.ports[0])
    for thread in threads:
        thread.join()
    for i in (0, 1):
        assert answers[i].status_code == 503 and "holds the answer" in answers[i].json()["reason"], answers[i].text
        deadline = time.monotonic() + 30
        while (r := via(sidecars[i], runs[i], "a1").post(f"{generate}?delay_ms=3000", json={"step": 2})).status_code \
                == 503:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.5)
        assert r.headers["Durable-Outcome"] == "replayed"
        assert via(sidecars[i], runs[i], "a1").post(generate, json={"step": 3}).headers["Durable-Outcome"] == "recorded"
    assert http_api.books()["charges"] == 6  # three calls of each run, once each
    assert dict(sql(cluster.dsn, HELD_LEASES)) == {lease: generation + 1 for lease, generation in leases.items()}


def test_the_fleet_benchmark_compares_citus_with_one_postgresql(cluster: citus_cluster.Cluster, pg_dsn: str) -> None:
    """scripts/bench_fleet.py --citus: the distributed layout beside one PostgreSQL's, each with its
    floor; every step journaled once with dense seqs, and the CPU split between the coordinator and
    the workers printed."""
    rows, out = fleet_benchmark("--sidecars", "1", "--agents", "2", "--calls", "5", "--layouts", "0", "--rounds", "1",
                                "--dsn", pg_dsn, "--citus", cluster.dsn)
    assert set(rows) == {(layout, path) for layout in ("one table", "Citus, 2 workers")
                         for path in ("floor", "sidecars")}, out
    assert all(row[0] == "10" and row[-1] == "True" for row in rows.values()), out  # steps, seqs dense
    coordinator, workers = (float(v) for v in rows[("Citus, 2 workers", "sidecars")][7:9])
    assert coordinator > 0 and workers > 0, out  # each side's CPU per step, measured
