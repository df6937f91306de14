#!/usr/bin/env python3
"""Scale out: several sidecar processes share one PostgreSQL, each serving concurrent agents (runs).

Measures steps/s and journal writes/s across the fleet, the journal's bytes per step, and
extrapolates what a fleet of N agents costs (writes per second, storage per day).

Usage: .venv/bin/python scripts/bench_fleet.py [--sidecars 4] [--agents-per-sidecar 4] [--calls 200]
       [--fleet 1000] [--call-every 5] [--dsn DSN]
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

from durable_sidecar import database  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sidecars", type=int, default=4)
    parser.add_argument("--agents-per-sidecar", type=int, default=4)
    parser.add_argument("--calls", type=int, default=200, help="calls per agent")
    parser.add_argument("--fleet", type=int, default=1000, help="agents to extrapolate to")
    parser.add_argument("--call-every", type=float, default=5.0, help="seconds between an agent's calls, for the estimate")
    parser.add_argument("--dsn")
    args = parser.parse_args()

    server = database.resolve(args.dsn).dsn
    dsn = database.create_database(server, "durable_fleet")
    upstream = bench.start_upstream()
    try:
        with tempfile.TemporaryDirectory(prefix="durable-fleet-") as tmp:
            work = Path(tmp)
            proxies = [bench.start_proxy(bench.sidecar_args(dsn), work / "conf", work / f"sidecar{i}.log")
                       for i in range(args.sidecars)]
            results: list[dict[str, float]] = []
            lock = threading.Lock()

            def agent(port: int) -> None:
                latencies = bench.client_loop(port, upstream, f"fleet-{uuid.uuid4().hex[:8]}", "a1", range(args.calls))
                with lock:
                    results.append({"p50": statistics.median(latencies), "n": len(latencies)})

            elapsed = bench.run_threads(
                [threading.Thread(target=agent, args=(p.port,)) for p in proxies for _ in range(args.agents_per_sidecar)]
            )
            for p in proxies:
                p.stop()
        with psycopg.connect(dsn) as conn:
            steps, = conn.execute("SELECT count(*) FROM durable_steps").fetchone()
            table_bytes, = conn.execute("SELECT pg_total_relation_size('durable_steps')").fetchone()
            body_bytes, = conn.execute(
                "SELECT avg(octet_length(request_body) + coalesce(octet_length(response_body), 0)) FROM durable_steps"
            ).fetchone()
            seqs_ok, = conn.execute(
                "SELECT bool_and(n = m) FROM (SELECT count(*) AS n, max(seq) AS m FROM durable_steps GROUP BY run_id) x"
            ).fetchone()
    finally:
        database.drop_database(server, dsn)

    agents = len(results)
    rate = steps / elapsed
    per_step = table_bytes / max(steps, 1)
    print(f"\n{args.sidecars} sidecars x {args.agents_per_sidecar} agents = {agents} concurrent runs, {args.calls} calls each")
    print(f"steps journaled: {steps} in {elapsed:.1f}s = {rate:.0f} steps/s = {2 * rate:.0f} journal writes/s "
          f"(seqs dense per run: {seqs_ok})")
    print(f"median of per-agent p50 latency: {statistics.median(r['p50'] for r in results):.2f} ms")
    print(f"journal size: {per_step:.0f} bytes per step on disk (table + indexes + TOAST), "
          f"of which bodies {float(body_bytes or 0):.0f} bytes")
    fleet_rate = args.fleet / args.call_every
    overhead = per_step - float(body_bytes or 0)  # row, envelope, headers, indexes
    per_day = lambda size: fleet_rate * 86400 * size / 2**30  # noqa: E731
    print(f"\na fleet of {args.fleet} agents calling once every {args.call_every:g}s: {fleet_rate:.0f} steps/s = "
          f"{2 * fleet_rate:.0f} journal writes/s ({fleet_rate / rate:.2f}x what this machine's fleet just did)")
    print(f"storage per day: {per_day(per_step):.1f} GiB at this step size; {per_day(overhead + 10240):.1f} GiB with "
          f"10 KiB of bodies per step (a typical LLM call); retention (durable_retention) bounds the total")


if __name__ == "__main__":
    main()
