#!/usr/bin/env python3
"""The journal alone, no proxy: what one step's two commits cost through the sidecar's Journal
(record, then complete: batching, deadlines, the pool) against the very same two statements on one
connection, and against the floor's trivial INSERT and UPDATE. Interleaved rounds, medians; per
step: wall ms, this process's CPU ms and PostgreSQL's CPU ms (read from /proc: PostgreSQL must run
on this machine to be counted).

Then a step's answer by the length of its run: one run of --long steps through the Journal, the
mean ms of each answer (`complete`) per thousand steps. Flat is right: a lookup by (run, seq);
growing means the answer reads past the run's earlier steps (vacuum off makes it show at once).

Usage: .venv/bin/python scripts/bench_journal.py [--steps 1000] [--rounds 3] [--long 4000] [--dsn DSN]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (postgres_cpu_s)
import floor_addon  # noqa: E402  (the floor's statements)

from durable_sidecar.store import database
from durable_sidecar.store.journal import _COMPLETE, _RECORD, Journal, NewStep

Step = Callable[[str, int], Awaitable[None]]


def new_step(run: str, n: int, owner: int) -> NewStep:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "step %d"}]}' % n
    return NewStep(
        run=run,
        attempt="a1",
        key=f"v2:{uuid.uuid4().hex}",
        fp_version=2,
        occurrence=0,
        step_key=None,
        method="POST",
        url="http://127.0.0.1/v1/chat/completions",
        envelope={"m": "POST", "b": {"n": n}},
        request_headers=[["content-type", "application/json"]],
        request_body=body,
        agent_idempotency_key=None,
        mint_idempotency_key=True,
        owner=owner,
    )


ANSWER = b'{"choices": [{"message": {"content": "ok"}}]}'


def paths(journal: Journal, conn: psycopg.AsyncConnection, owner: int) -> dict[str, Step]:
    async def through_journal(run: str, n: int) -> None:
        recorded = await journal.record(new_step(run, n, owner))
        assert recorded is not None
        await journal.complete(
            run, recorded.seq, "completed", 200, "OK", "HTTP/1.1", [["a", "b"]], ANSWER, 1.0, owner=owner
        )

    async def same_statements(run: str, n: int) -> None:
        step = new_step(run, n, owner)
        cursor = await conn.cursor(row_factory=dict_row).execute(
            _RECORD, journal._record_params(step, step.request_body)
        )
        seq = (await cursor.fetchone())["seq"]
        await conn.execute(
            _COMPLETE,
            (
                "completed",
                200,
                "OK",
                "HTTP/1.1",
                Jsonb([["a", "b"]]),
                ANSWER,
                1.0,
                False,
                False,
                None,
                None,
                None,
                run,
                seq,
                owner,
            ),
        )

    ids = itertools.count()

    async def floor(run: str, n: int) -> None:
        row = next(ids)
        await conn.execute(floor_addon.INSERT, (row, new_step(run, n, owner).request_body))
        await conn.execute(floor_addon.UPDATE, (ANSWER, row))

    return {
        "Journal (record, complete)": through_journal,
        "same statements, one connection": same_statements,
        "floor's INSERT and UPDATE": floor,
    }


async def measure(step: Step, steps: int) -> dict[str, float]:
    run = f"bench-{uuid.uuid4().hex[:8]}"
    for n in range(20):  # warm: statements prepared, the run's row made
        await step(run, n)
    wall, cpu, pg = time.perf_counter(), time.process_time(), bench.postgres_cpu_s()
    for n in range(20, 20 + steps):
        await step(run, n)
    return {
        "wall": (time.perf_counter() - wall) * 1000 / steps,
        "cpu": (time.process_time() - cpu) * 1000 / steps,
        "pg": (bench.postgres_cpu_s() - pg) * 1000 / steps,
    }


async def by_run_length(journal: Journal, owner: int, steps: int) -> list[float]:
    run, per_thousand, spent = f"long-{uuid.uuid4().hex[:8]}", [], 0.0
    for n in range(steps):
        recorded = await journal.record(new_step(run, n, owner))
        assert recorded is not None
        started = time.perf_counter()
        await journal.complete(run, recorded.seq, "completed", 200, "OK", "HTTP/1.1", [], ANSWER, 1.0, owner=owner)
        spent += time.perf_counter() - started
        if n % 1000 == 999:
            per_thousand.append(spent)  # seconds per 1000 answers = ms per answer
            spent = 0.0
    return per_thousand


async def main(args: argparse.Namespace) -> None:
    server = database.resolve(args.dsn).dsn
    dsn = database.create_database(server, "durable_bench_journal")
    journal = Journal(dsn)
    try:
        await journal.open()
        owner = await journal.owner()
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute(floor_addon.CREATE)
            rounds: dict[str, list[dict[str, float]]] = {}
            compared = paths(journal, conn, owner)
            for _ in range(args.rounds):
                for name, step in compared.items():
                    rounds.setdefault(name, []).append(await measure(step, args.steps))
        print(f"\none step's two commits, {args.steps} steps per round, medians of {args.rounds} interleaved rounds")
        print(f"{'path':<34} {'wall ms':>8} {'CPU ms':>8} {'pg CPU ms':>10}")
        for name, results in rounds.items():
            print(
                f"{name:<34}"
                + "".join(
                    f" {statistics.median(r[k] for r in results):>{w}.3f}"
                    for k, w in (("wall", 8), ("cpu", 8), ("pg", 10))
                )
            )
        if args.long:
            print(f"\na step's answer by the length of its run ({args.long} steps, one run), mean ms per answer")
            for k, ms in enumerate(await by_run_length(journal, owner, args.long)):
                print(f"  steps {k * 1000 + 1:>6}-{(k + 1) * 1000:<6} {ms:.3f}")
    finally:
        await journal.close()
        database.drop_database(server, dsn)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--long", type=int, default=4000, help="steps of the run-length measurement (0: skip it)")
    parser.add_argument("--dsn")
    asyncio.run(main(parser.parse_args()))
