#!/usr/bin/env python3
"""Scale out: several sidecar processes share one PostgreSQL, each serving concurrent agents (runs),
once per journal layout: one durable_steps table, hash-partitioned by run (`durable db init
--partitions N`), and with --citus, distributed over a Citus cluster's workers; each on a database
of its own, side by side, interleaved; and beside each, the fleet's floor:
as many clients making the journal's own two commits per step (durable_record, then the answer's
UPDATE, with the same rows) straight to PostgreSQL, no proxy.

Measures steps/s and journal writes/s across the fleet, the ratio to the floor, latency, the CPU
per step of the proxies, of PostgreSQL (on Citus: the coordinator's and the workers') and of this
process (the clients and the upstream), the journal's bytes per step, and extrapolates what a fleet of N agents costs (writes per second,
storage per day).

Usage: .venv/bin/python scripts/bench_fleet.py [--sidecars 4] [--agents 8,32] [--calls 200]
       [--layouts 0,16] [--rounds 2] [--fleet 1000] [--call-every 5] [--dsn DSN] [--citus COORDINATOR_DSN]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (its upstream, proxies and client)

from durable_sidecar.matching.fingerprint import MatchRules, RequestParts, match
from durable_sidecar.store import citus, database
from durable_sidecar.store.journal import _COMPLETE, _RECORD, storable
from durable_sidecar.tools import operations

REQUEST_HEADERS = [["Host", "127.0.0.1"], ["Accept-Encoding", "identity"], ["Content-Type", "application/json"]]
ANSWER_HEADERS = [["Content-Type", "application/json"], ["Content-Length", str(len(bench.ANSWER))]]


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def server_cpu_s(dsn: str) -> float:
    """CPU seconds of the PostgreSQL server behind `dsn`: its postmaster, its live processes, and the
    ones it has reaped (a backend that exited leaves its CPU in the postmaster's cutime/cstime)."""
    with psycopg.connect(dsn) as conn:
        postmaster = int(conn.execute("SELECT pg_read_file('postmaster.pid')").fetchone()[0].split()[0])
    fields = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()
    total = sum(int(fields[i]) for i in (11, 12, 13, 14)) / bench.CLOCK_TICKS
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                total += bench.process_cpu_s(entry.name)
        except (OSError, ValueError):
            pass  # exited meanwhile
    return total


def floor_agent(conn: psycopg.Connection, run: str, upstream: int, calls: int) -> list[float]:
    """One agent of the floor: per step the journal's two commits with the rows the sidecar writes
    (its envelope, headers, bodies, a minted idempotency key), straight to PostgreSQL, no proxy."""
    url = f"http://127.0.0.1:{upstream}/v1/chat/completions"
    latencies = []
    for i in range(calls):
        body = bench.BODY % i
        parts = RequestParts("POST", "http", "127.0.0.1", upstream, "/v1/chat/completions",
                             [("Content-Type", "application/json")], body)
        _, envelope, key = match(parts, None, 1 << 20, MatchRules())
        start = time.perf_counter()
        seq, _ = conn.execute(_RECORD, {
            "run": run, "key": key, "fpv": 2, "occ": 0, "step_key": None, "attempt": "a1", "outcome": "recorded",
            "divergence": None, "key_id": None, "owner": 1, "method": "POST", "url": url,
            "envelope": Jsonb(storable(envelope)), "headers": Jsonb(REQUEST_HEADERS), "body": body,
            "agent_key": None, "mint": True, "choice": None,
        }).fetchone()
        conn.execute(_COMPLETE, ("completed", 200, "OK", "HTTP/1.1", Jsonb(ANSWER_HEADERS), bench.ANSWER, 0.5,
                                 False, False, None, None, None, run, seq, 1))
        latencies.append((time.perf_counter() - start) * 1000)
    return latencies


def fleet(layout: str, agents: int, floor: bool, args: argparse.Namespace, upstream: int) -> dict[str, float]:
    """One fleet run on a fresh journal with this layout ("0": one table, "N": N hash partitions,
    "citus": distributed on the --citus cluster): `agents` runs spread over the sidecars, or with
    `floor`, as many clients committing straight to PostgreSQL."""
    server = args.citus if layout == "citus" else database.resolve(args.dsn).dsn
    dsn = database.create_database(server, "durable_fleet")
    try:
        operations.create_journal(dsn, 0 if layout == "citus" else int(layout))
        servers = citus.node_dsns(dsn)
        with tempfile.TemporaryDirectory(prefix="durable-fleet-") as tmp:
            work = Path(tmp)
            proxies = [] if floor else [
                bench.start_proxy(bench.sidecar_args(dsn), work / "conf", work / f"sidecar{i}.log")
                for i in range(args.sidecars)]
            # the floor's connections outlive the measurement: an exited backend's CPU leaves /proc with it
            conns = [psycopg.connect(dsn, autocommit=True) for _ in range(agents)] if floor else []
            p50s: list[float] = []
            lock = threading.Lock()

            def agent(n: int) -> None:
                run = f"fleet-{uuid.uuid4().hex[:8]}"
                latencies = (floor_agent(conns[n], run, upstream, args.calls) if floor else
                             bench.client_loop(proxies[n % len(proxies)].port, upstream, run, "a1", range(args.calls)))
                with lock:
                    p50s.append(statistics.median(latencies))

            cpu = [sum(p.cpu_s() for p in proxies), self_cpu_s(), *map(server_cpu_s, servers)]
            try:
                elapsed = bench.run_threads([threading.Thread(target=agent, args=(n,)) for n in range(agents)])
                after = [sum(p.cpu_s() for p in proxies), self_cpu_s(), *map(server_cpu_s, servers)]
                cpu = [b - a for a, b in zip(cpu, after, strict=True)]
            finally:
                for p in proxies:
                    p.stop()
                for conn in conns:
                    conn.close()
        with psycopg.connect(dsn) as conn:
            steps, = conn.execute("SELECT count(*) FROM durable_steps").fetchone()
            table_bytes, = conn.execute(
                "SELECT citus_total_relation_size('durable_steps')" if layout == "citus" else
                "SELECT sum(pg_total_relation_size(c)) FROM (SELECT 'durable_steps'::regclass AS c"
                " UNION ALL SELECT inhrelid FROM pg_inherits WHERE inhparent = 'durable_steps'::regclass) t"
            ).fetchone()
            body_bytes, = conn.execute(
                "SELECT avg(octet_length(request_body) + coalesce(octet_length(response_body), 0)) FROM durable_steps"
            ).fetchone()
            seqs_ok, = conn.execute(
                "SELECT bool_and(n = m) FROM (SELECT count(*) AS n, max(seq) AS m FROM durable_steps GROUP BY run_id) x"
            ).fetchone()
            used, = conn.execute(
                "SELECT count(DISTINCT tableoid) FROM durable_steps"
            ).fetchone()
    finally:
        database.drop_database(server, dsn)
    per_step_ms = 1000 / max(steps, 1)
    return {"steps": steps, "elapsed": elapsed, "rate": steps / elapsed, "p50": statistics.median(p50s),
            "per_step": float(table_bytes) / max(steps, 1), "body": float(body_bytes or 0), "dense": seqs_ok,
            "tables_used": used, "proxy_cpu": cpu[0] * per_step_ms, "client_cpu": cpu[1] * per_step_ms,
            "pg_cpu": sum(cpu[2:]) * per_step_ms, "coordinator_cpu": cpu[2] * per_step_ms,
            "workers_cpu": sum(cpu[3:]) * per_step_ms, "workers": len(servers) - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sidecars", type=int, default=4)
    parser.add_argument("--agents", default="8,32", help="concurrent agents (runs) across the sidecars, to compare")
    parser.add_argument("--calls", type=int, default=200, help="calls per agent")
    parser.add_argument("--layouts", default="0,16", help="partition counts to compare (0: one table)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per configuration (medians)")
    parser.add_argument("--fleet", type=int, default=1000, help="agents to extrapolate to")
    parser.add_argument("--call-every", type=float, default=5.0, help="seconds between an agent's calls, for the estimate")
    parser.add_argument("--dsn", help="the PostgreSQL of the one-table and partitioned layouts")
    parser.add_argument("--citus", metavar="DSN", help="a Citus coordinator: adds the distributed layout")
    args = parser.parse_args()

    upstream = bench.start_upstream()
    layouts = args.layouts.split(",") + (["citus"] if args.citus else [])
    agent_counts = [int(n) for n in args.agents.split(",")]
    configs = [(n, agents, floor) for agents in agent_counts for n in layouts for floor in (True, False)]
    samples: dict[tuple[str, int, bool], list[dict[str, float]]] = {c: [] for c in configs}
    for _ in range(args.rounds):
        for config in configs:
            samples[config].append(fleet(*config, args, upstream))
    results = {c: {k: statistics.median(float(r[k]) for r in rs) for k in rs[0]} for c, rs in samples.items()}

    print(f"\n{args.sidecars} sidecars; the floor: as many clients making the journal's two commits per step "
          f"straight to PostgreSQL; {args.calls} calls per agent, median of {args.rounds} interleaved rounds")
    print(f"{'agents':>6} {'layout':<20} {'path':<9} {'steps':>6} {'steps/s':>8} {'/ floor':>8} {'writes/s':>9} {'agent p50 ms':>13}"
          f" {'CPU ms/step: proxies':>21} {'PostgreSQL':>11} {'(coord.':>8} {'workers)':>9} {'clients':>8}"
          f" {'bytes/step':>11} {'tables':>7} {'seqs dense':>11}")
    for (layout, agents, floor), r in results.items():
        name = (f"Citus, {r['workers']:.0f} workers" if layout == "citus" else
                f"{layout} hash partitions" if layout != "0" else "one table")
        ratio = r["rate"] / results[(layout, agents, True)]["rate"]
        split = (f"{r['coordinator_cpu']:>8.2f} {r['workers_cpu']:>9.2f}" if layout == "citus" else f"{'':>8} {'':>9}")
        print(f"{agents:>6} {name:<20} {'floor' if floor else 'sidecars':<9} {r['steps']:>6.0f} {r['rate']:>8.0f} {ratio:>8.2f}"
              f" {2 * r['rate']:>9.0f} {r['p50']:>13.2f} {r['proxy_cpu']:>21.2f} {r['pg_cpu']:>11.2f} {split}"
              f" {r['client_cpu']:>8.2f} {r['per_step']:>11.0f} {r['tables_used']:>7.0f} {bool(r['dense'])!s:>11}")

    base = results[(layouts[0], agent_counts[0], False)]
    fleet_rate = args.fleet / args.call_every
    overhead = base["per_step"] - base["body"]  # row, envelope, headers, indexes
    per_day = lambda size: fleet_rate * 86400 * size / 2**30  # noqa: E731
    print(f"\na fleet of {args.fleet} agents calling once every {args.call_every:g}s: {fleet_rate:.0f} steps/s = "
          f"{2 * fleet_rate:.0f} journal writes/s ({fleet_rate / base['rate']:.2f}x what this machine's fleet just did)")
    print(f"storage per day: {per_day(base['per_step']):.1f} GiB at this step size; {per_day(overhead + 10240):.1f} GiB "
          f"with 10 KiB of bodies per step (a typical LLM call); retention (durable_retention) bounds the total")


if __name__ == "__main__":
    main()
