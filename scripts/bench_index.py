#!/usr/bin/env python3
"""What a new attempt of a long run costs PostgreSQL: the run's whole replay index, streamed in
digest order (journal.load_index). Compared in one run, on the same rows: the index as read now
(the stored digest, from the unique index in its order: migration 9) and as it was read before
(the digest computed per step with sha256, then sorted). Prints each plan's top node, whether it
sorts, its PostgreSQL time (EXPLAIN ANALYZE, medians), and the time the sidecar's own load_index
takes end to end.

Usage: .venv/bin/python scripts/bench_index.py [--steps 100000] [--repeat 5] [--dsn DSN]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (fill_run)

from durable_sidecar.store import database
from durable_sidecar.store.cursor import RunCursor
from durable_sidecar.store.journal import INDEX, Journal

# the index's query before migration 9: the digest computed for every step, then a sort
BEFORE = (
    "SELECT ('x' || encode(substr(sha256(convert_to(occurrence || ':' || fingerprint, 'UTF8')), 1, 8), 'hex'))"
    "::bit(64)::bigint AS digest, seq, state FROM durable_steps WHERE run_id = %s ORDER BY digest"
)


def explain(conn: psycopg.Connection, query: str, run: str) -> tuple[float, str, bool]:
    """(execution ms, the plan's top node, whether it sorts) of the query as the cursor runs it."""
    with conn.transaction():
        lines = [row[0] for row in conn.execute(
            f"EXPLAIN (ANALYZE, BUFFERS) DECLARE c CURSOR FOR {query.replace('%s', "'" + run + "'")}")]
        # a cursor's EXPLAIN ANALYZE runs it to the end, as load_index does a page at a time
    ms = next(float(line.split(":")[1].split()[0]) for line in lines if line.startswith("Execution Time"))
    return ms, lines[0].split("  (")[0].strip(), any("Sort" in line for line in lines)


async def load(dsn: str, run: str) -> float:
    journal = Journal(dsn)
    await journal.open()
    try:
        start = time.perf_counter()
        cursor = RunCursor()
        await journal.load_index(run, cursor)
        assert cursor.max_seq > 0
        return (time.perf_counter() - start) * 1000
    finally:
        await journal.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dsn")
    args = parser.parse_args()

    server = database.resolve(args.dsn).dsn
    dsn = database.create_database(server, "durable_bench_index")
    try:
        asyncio.run(load_ready(dsn))
        bench.fill_run(dsn, "other", 1000, 1)  # the run is not alone in the table
        bench.fill_run(dsn, "long", args.steps, 1)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE durable_steps")
            results = {}
            for name, query in (("now: stored digest, index order", INDEX), ("before: sha256 per step, sorted", BEFORE)):
                runs = [explain(conn, query, "long") for _ in range(args.repeat)]
                results[name] = (statistics.median(r[0] for r in runs), runs[0][1], runs[0][2])
        loads = [asyncio.run(load(dsn, "long")) for _ in range(args.repeat)]
    finally:
        database.drop_database(server, dsn)

    print(f"\nthe whole replay index of a {args.steps:,}-step run, medians of {args.repeat}")
    print(f"{'query':<34} {'PostgreSQL ms':>14} {'sorts':>6}  plan")
    for name, (ms, top, sorts) in results.items():
        print(f"{name:<34} {ms:>14.1f} {sorts!s:>6}  {top}")
    print(f"the sidecar's load_index, end to end (now): {statistics.median(loads):.1f} ms")


async def load_ready(dsn: str) -> None:
    journal = Journal(dsn)
    await journal.open()  # applies the migrations
    await journal.close()


if __name__ == "__main__":
    main()
