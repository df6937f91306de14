#!/usr/bin/env python3
"""Scale out: several sidecar processes share one PostgreSQL, each serving concurrent agents (runs),
once per journal layout: one durable_steps table, and hash-partitioned by run (`durable db init
--partitions N`), each on a database of its own, side by side.

Measures steps/s and journal writes/s across the fleet, latency, the journal's bytes per step, and
extrapolates what a fleet of N agents costs (writes per second, storage per day).

Usage: .venv/bin/python scripts/bench_fleet.py [--sidecars 4] [--agents-per-sidecar 4] [--calls 200]
       [--layouts 0,16] [--fleet 1000] [--call-every 5] [--dsn DSN]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import uuid
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (its upstream, proxies and client)

from durable_sidecar.store import database
from durable_sidecar.tools import operations


def fleet(server: str, partitions: int, args: argparse.Namespace, upstream: int) -> dict[str, float]:
    """One fleet run on a fresh journal with this layout (0: one table)."""
    dsn = database.create_database(server, "durable_fleet")
    try:
        operations.create_journal(dsn, partitions)
        with tempfile.TemporaryDirectory(prefix="durable-fleet-") as tmp:
            work = Path(tmp)
            proxies = [bench.start_proxy(bench.sidecar_args(dsn), work / "conf", work / f"sidecar{i}.log")
                       for i in range(args.sidecars)]
            p50s: list[float] = []
            lock = threading.Lock()

            def agent(port: int) -> None:
                latencies = bench.client_loop(port, upstream, f"fleet-{uuid.uuid4().hex[:8]}", "a1", range(args.calls))
                with lock:
                    p50s.append(statistics.median(latencies))

            try:
                elapsed = bench.run_threads(
                    [threading.Thread(target=agent, args=(p.port,)) for p in proxies for _ in range(args.agents_per_sidecar)]
                )
            finally:
                for p in proxies:
                    p.stop()
        with psycopg.connect(dsn) as conn:
            steps, = conn.execute("SELECT count(*) FROM durable_steps").fetchone()
            table_bytes, = conn.execute(
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
    return {"steps": steps, "elapsed": elapsed, "rate": steps / elapsed, "p50": statistics.median(p50s),
            "per_step": float(table_bytes) / max(steps, 1), "body": float(body_bytes or 0), "dense": seqs_ok,
            "tables_used": used}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sidecars", type=int, default=4)
    parser.add_argument("--agents-per-sidecar", type=int, default=4)
    parser.add_argument("--calls", type=int, default=200, help="calls per agent")
    parser.add_argument("--layouts", default="0,16", help="partition counts to compare (0: one table)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per layout (medians)")
    parser.add_argument("--fleet", type=int, default=1000, help="agents to extrapolate to")
    parser.add_argument("--call-every", type=float, default=5.0, help="seconds between an agent's calls, for the estimate")
    parser.add_argument("--dsn")
    args = parser.parse_args()

    server = database.resolve(args.dsn).dsn
    upstream = bench.start_upstream()
    layouts = [int(n) for n in args.layouts.split(",")]
    samples: dict[int, list[dict[str, float]]] = {n: [] for n in layouts}
    for _ in range(args.rounds):
        for n in layouts:
            samples[n].append(fleet(server, n, args, upstream))
    results = {n: {k: statistics.median(float(r[k]) for r in rs) for k in rs[0]} for n, rs in samples.items()}

    agents = args.sidecars * args.agents_per_sidecar
    print(f"\n{args.sidecars} sidecars x {args.agents_per_sidecar} agents = {agents} concurrent runs, {args.calls} calls "
          f"each, median of {args.rounds} interleaved rounds per layout")
    print(f"{'layout':<24} {'steps':>6} {'steps/s':>8} {'writes/s':>9} {'agent p50 ms':>13} {'bytes/step':>11} {'tables used':>12}"
          f" {'seqs dense':>11}")
    for n, r in results.items():
        name = f"{n} hash partitions" if n else "one table"
        print(f"{name:<24} {r['steps']:>6.0f} {r['rate']:>8.0f} {2 * r['rate']:>9.0f} {r['p50']:>13.2f} {r['per_step']:>11.0f}"
              f" {r['tables_used']:>12.0f} {bool(r['dense'])!s:>11}")

    base = results[layouts[0]]
    fleet_rate = args.fleet / args.call_every
    overhead = base["per_step"] - base["body"]  # row, envelope, headers, indexes
    per_day = lambda size: fleet_rate * 86400 * size / 2**30  # noqa: E731
    print(f"\na fleet of {args.fleet} agents calling once every {args.call_every:g}s: {fleet_rate:.0f} steps/s = "
          f"{2 * fleet_rate:.0f} journal writes/s ({fleet_rate / base['rate']:.2f}x what this machine's fleet just did)")
    print(f"storage per day: {per_day(base['per_step']):.1f} GiB at this step size; {per_day(overhead + 10240):.1f} GiB "
          f"with 10 KiB of bodies per step (a typical LLM call); retention (durable_retention) bounds the total")


if __name__ == "__main__":
    main()
