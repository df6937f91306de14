"""The journal's own statements on a real PostgreSQL, in process (no sidecar, no proxy): what each
statement leaves in the tables and how PostgreSQL plans it. Quick enough to be the journal's first
tier of tests in scripts/mutate.sh; the database's life cycle (embedded default, failing closed,
layouts) is in test_journal_db.py."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import psycopg
import pytest

from durable_sidecar.store.cursor import RunCursor, StepRef, digest
from durable_sidecar.store.journal import _COMPLETE, INDEX, Journal, NewStep
from durable_sidecar.store.migrations import MIGRATIONS
from conftest import sql


def test_migrations_are_safe_when_several_sidecars_start_at_once(fresh_dsn: str) -> None:
    async def open_many() -> None:
        journals = [Journal(fresh_dsn) for _ in range(6)]
        await asyncio.gather(*(j.open() for j in journals))
        await asyncio.gather(*(j.close() for j in journals))

    asyncio.run(open_many())
    assert sql(fresh_dsn, "SELECT version FROM durable_schema_version ORDER BY 1") == [(v,) for v, _ in MIGRATIONS]
    with psycopg.connect(fresh_dsn) as conn:
        tables = {r[0] for r in conn.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")}
    assert {"durable_runs", "durable_steps", "journal", "durable_schema_version"} <= tables


def bare_step(run: str, key: str, occurrence: int = 0, **fields: Any) -> NewStep:
    """A pending step with nothing but its identity, for tests of the journal's own statements."""
    step = NewStep(run=run, attempt="a1", key=key, fp_version=1, occurrence=occurrence, step_key=None, method="POST",
                   url="http://x/", envelope={}, request_headers=[], request_body=b"", agent_idempotency_key=None,
                   mint_idempotency_key=False)
    return dataclasses.replace(step, **fields)


@pytest.mark.parametrize("page", [4096, 50], ids=["head only", "head then whole"])
def test_the_index_loads_from_sql_digests_that_match_the_cursors(fresh_dsn: str, page: int, monkeypatch) -> None:
    """The journal sorts the replay index by a digest computed in SQL; the cursor looks keys up by
    the same digest computed in Python. Were they to differ, every replay would miss and re-send.
    A run longer than a page arrives in two parts: its first steps by seq (the cursor serves them at
    once), then the whole index, which the cursor adopts without losing what it learnt meanwhile."""
    from durable_sidecar.store import journal as journal_module

    monkeypatch.setattr(journal_module, "INDEX_PAGE", page)
    keys = [f"v1:{n:064x}" for n in range(300)] + ["key:paiement-é", "key:支払い", "key:" + "k" * 2000]
    at_head: list[list[int | None]] = []

    async def journal_and_load() -> list[int]:
        journal = Journal(fresh_dsn)
        await journal.open()
        try:
            for key in keys:
                for occurrence in (0, 1):
                    await journal.record(bare_step("r", key, occurrence))
            cursor = RunCursor()
            # what the attempt has claimed by the time the head is in (the first key, both occurrences)
            claimed = lambda: at_head.append([cursor.claim(keys[0]).step.seq for _ in (0, 1)])  # noqa: E731
            await journal.load_index("r", cursor, claimed)
            assert cursor.consumed(1) and cursor.consumed(2) and cursor.claim(keys[0]).step is None
            return [cursor.claim(key).step.seq for key in keys[1:] for _ in (0, 1)]
        finally:
            await journal.close()

    assert asyncio.run(journal_and_load()) == list(range(3, 2 * len(keys) + 1))
    assert at_head == [[1, 2]]  # served from the head, and still consumed after the whole index came
    in_sql = sql(fresh_dsn, "SELECT digest, fingerprint, occurrence FROM durable_steps")
    assert all(d == digest(key, occurrence) for d, key, occurrence in in_sql) and len(in_sql) == 2 * len(keys)


def test_a_new_attempt_reads_a_long_runs_index_with_no_sort_and_no_hashing(fresh_dsn: str) -> None:
    """The digest is stored at insert and indexed with the run (migration 9): the plan of the cursor
    that streams a 20,000-step run's whole index to a new attempt walks that index, with no Sort
    node and no sha256 over the run's steps. Before it, each attempt hashed and sorted them all."""

    async def migrate() -> None:
        journal = Journal(fresh_dsn)
        await journal.open()  # applies the migrations
        await journal.close()

    asyncio.run(migrate())
    sql(fresh_dsn, "INSERT INTO durable_runs (id, last_seq) VALUES ('long', 20000), ('short', 10)")
    sql(fresh_dsn, "INSERT INTO durable_steps (run_id, seq, fingerprint, fp_version, occurrence, state, attempt,"
                   " method, url, envelope, request_headers)"
                   " SELECT r, n, 'v1:' || md5(r || n), 1, 0, 'completed', 'a1', 'POST', 'http://x/', '{}', '[]'"
                   " FROM (VALUES ('long', 20000), ('short', 10)) AS runs(r, steps), generate_series(1, steps) AS n")
    sql(fresh_dsn, "ANALYZE durable_steps")
    with psycopg.connect(fresh_dsn) as conn, conn.transaction():
        plan = "\n".join(row[0] for row in conn.execute(
            f"EXPLAIN (VERBOSE) DECLARE durable_index CURSOR FOR {INDEX.replace('%s', "'long'")}"))
    assert "Index" in plan and "digest" in plan, plan
    assert "Sort" not in plan and "sha256" not in plan and "durable_digest" not in plan, plan
    stored = sql(fresh_dsn, "SELECT digest, fingerprint, occurrence FROM durable_steps WHERE run_id = 'long' LIMIT 5")
    assert all(d == digest(key, occurrence) for d, key, occurrence in stored)


def test_a_long_runs_answer_finds_its_step_in_one_lookup(fresh_dsn: str) -> None:
    """A step's answer (and fail, let-go, give-back) names its run and seq among the run's pending
    steps. The pending index keeps an entry for every step its run ever had until vacuum runs: keyed
    by run alone, each answer read past all of them, and a run's answers grew slower with its length
    (2.9 ms each at its 4,000th step). Keyed by (run, seq) since migration 10, the seq is in the
    index condition of the answer's plan, whatever index the planner picks."""

    async def answer_300_steps() -> None:
        journal = Journal(fresh_dsn)
        await journal.open()
        try:
            for n in range(301):
                recorded = await journal.record(bare_step("long", f"k{n}"))
                assert recorded is not None
                if n < 300:
                    await journal.complete("long", recorded.seq, "completed", 200, "OK", "HTTP/1.1", [], b"", 1.0)
        finally:
            await journal.close()

    asyncio.run(answer_300_steps())
    params = ("completed", 200, "OK", "HTTP/1.1", None, b"", 1.0, False, False, None, None, None, "long", 301, None)
    with psycopg.connect(fresh_dsn) as conn:
        plan = "\n".join(row[0] for row in conn.execute(f"EXPLAIN {_COMPLETE}", params))
    conditions = [line for line in plan.splitlines() if "Index Cond" in line]
    assert conditions and "seq" in conditions[0], plan


def test_a_step_is_handed_over_for_a_resend_only_to_its_own_request(fresh_dsn: str) -> None:
    """The re-send of an in-doubt step carries its idempotency key; should the index's digest ever
    name the wrong step, the row's own (key, occurrence) keeps that key from being lent out."""

    async def resend(who: StepRef) -> object:
        journal = Journal(fresh_dsn)
        await journal.open()
        try:
            if not await journal.has_steps("r"):
                await journal.record(bare_step("r", "v1:pay", 1, agent_idempotency_key="k-1"))
            return await journal.take_over("r", who, "a2", pending_allowed=True, window_s=3600)
        finally:
            await journal.close()

    assert not asyncio.run(resend(StepRef(1, "v1:other", 1, "pending"))).taken
    assert not asyncio.run(resend(StepRef(1, "v1:pay", 0, "pending"))).taken
    taken = asyncio.run(resend(StepRef(1, "v1:pay", 1, "pending")))
    assert taken.taken and taken.idempotency_key == "k-1"


def test_recording_a_step_does_not_scan_its_run(fresh_dsn: str) -> None:
    """A new step is checked against its run through the (run, fingerprint, occurrence) index, so
    recording costs the same at step 10 and at step 10,000. Probing by run alone reads the whole run
    each time: ~n^2/2 index entries for n steps."""
    steps = 400

    async def record_run() -> None:
        journal = Journal(fresh_dsn)
        await journal.open()
        try:
            for n in range(steps):
                await journal.record(bare_step("long", f"v1:{n:064x}"))
        finally:
            await journal.close()  # its backends exit, flushing their statistics

    def index_use() -> tuple[int, int]:
        """(scans, entries read) of durable_steps' indexes"""
        return sql(fresh_dsn, "SELECT coalesce(sum(idx_scan), 0), coalesce(sum(idx_tup_read), 0)"
                              " FROM pg_stat_user_indexes WHERE relid = to_regclass('durable_steps') OR relid IN"
                              " (SELECT inhrelid FROM pg_inherits WHERE inhparent = to_regclass('durable_steps'))")[0]

    scans_before, read_before = index_use()
    asyncio.run(record_run())
    deadline = time.monotonic() + 10
    while (use := index_use())[0] - scans_before < steps and time.monotonic() < deadline:
        time.sleep(0.1)  # the statistics arrive when the journal's backends have exited
    scans, read = use[0] - scans_before, use[1] - read_before
    assert scans >= steps, "the statistics of the journal's backends never arrived"
    assert read < 5 * steps, f"{read} index entries read to record {steps} steps (a scan of the run per step)"


def test_racing_records_of_one_step_keep_seqs_dense(fresh_dsn: str) -> None:
    """Two sidecars (two pools) record the same 30 steps of a run at the same moment: each step is
    journaled once, and no seq is taken in vain (a gap would make Durable-Step lie about position)."""

    async def race() -> list[list[object]]:
        journals = [Journal(fresh_dsn), Journal(fresh_dsn)]
        for journal in journals:
            await journal.open()
        try:
            return await asyncio.gather(*(
                asyncio.gather(*(j.record(bare_step("race", f"v1:{n}")) for n in range(30)))
                for j in journals
            ))
        finally:
            for journal in journals:
                await journal.close()

    first, second = asyncio.run(race())
    recorded = [r for r in first + second if r is not None]
    assert len(recorded) == 30
    assert sql(fresh_dsn, "SELECT array_agg(seq ORDER BY seq) FROM durable_steps WHERE run_id = 'race'") == [(list(range(1, 31)),)]
    assert sql(fresh_dsn, "SELECT last_seq FROM durable_runs WHERE id = 'race'") == [(30,)]


def test_a_batch_of_group_committed_writes_is_all_or_nothing(fresh_dsn: str) -> None:
    """Writes that share a commit share its fate: one failing statement leaves none of the batch."""
    from durable_sidecar.store.journal import JournalError, Statement

    async def batch() -> None:
        journal = Journal(fresh_dsn)
        await journal.open()
        try:
            await journal.record(bare_step("batch", "v1:a"))
            ok = Statement("complete", "UPDATE durable_steps SET state = 'completed' WHERE run_id = 'batch'", ())
            bad = Statement("broken", "UPDATE durable_steps SET state = 'no such state' WHERE run_id = 'batch'", ())
            with pytest.raises(JournalError):
                await journal._execute([ok, bad])
        finally:
            await journal.close()

    asyncio.run(batch())
    assert sql(fresh_dsn, "SELECT state FROM durable_steps WHERE run_id = 'batch'") == [("pending",)]


def test_take_over_follows_the_single_flight_rules(fresh_dsn: str) -> None:
    """A completed step is never taken (nor its answer overwritten); a step whose sender is alive is
    not taken; one whose sender is gone is taken by exactly one of two sidecars racing for it."""

    async def scenario() -> dict[str, object]:
        sender, first, second, third = (Journal(fresh_dsn) for _ in range(4))
        for journal in (sender, first, second, third):
            await journal.open()
        seen: dict[str, object] = {}
        try:
            owner = await sender.owner()
            seen["lease-first"], seen["lease-second"] = await first.owner(), await second.owner()
            done = await sender.record(bare_step("tk", "v1:done", owner=owner))
            await sender.complete("tk", done.seq, "completed", 200, "OK", "HTTP/1.1", [], b"paid", 1.0, owner=owner)
            busy = await sender.record(bare_step("tk", "v1:busy", owner=owner))
            ref = lambda seq, key: StepRef(seq, key, 0, "pending")  # noqa: E731
            seen["completed"] = await first.take_over("tk", ref(done.seq, "v1:done"), "a2", True, 3600)
            seen["alive"] = await first.take_over("tk", ref(busy.seq, "v1:busy"), "a2", True, 3600)
            await sender.lease.close()  # the sender dies: PostgreSQL drops its lease at once
            # its lock is free, but a lease lost and re-taken looks the same for a moment: not taken
            # until the caller has seen the owner dead with one generation (for the grace period)
            seen["suspect"] = await first.take_over("tk", ref(busy.seq, "v1:busy"), "a2", True, 3600)
            dead = (seen["suspect"].owner, seen["suspect"].generation)
            stale = (dead[0], (dead[1] or 0) - 1)  # a generation before the one last seen: re-taken since
            seen["stale"] = await first.take_over("tk", ref(busy.seq, "v1:busy"), "a2", True, 3600, stale)
            seen["race"] = await asyncio.gather(
                first.take_over("tk", ref(busy.seq, "v1:busy"), "a2", True, 3600, dead),
                second.take_over("tk", ref(busy.seq, "v1:busy"), "a3", True, 3600, dead),
            )
            seen["fail-policy"] = await third.take_over("tk", ref(busy.seq, "v1:busy"), "a4", False, 3600, dead)
            with pytest.raises(JournalError):  # not ours any more: the late sender's answer is refused
                await sender.complete("tk", busy.seq, "completed", 200, "OK", "HTTP/1.1", [], b"late", 1.0, owner=owner)
            # nor may its late failure or hang-up touch the step the winner is sending
            await sender.fail("tk", busy.seq, "late failure", 1.0, owner)
            await sender.let_go("tk", busy.seq, owner)
            seen["after-late-sender"] = sql(fresh_dsn, "SELECT state, owner FROM durable_steps WHERE run_id = 'tk'"
                                            " AND fingerprint = 'v1:busy'")
        finally:
            for journal in (sender, first, second, third):
                await journal.close()
        return seen

    from durable_sidecar.store.journal import JournalError

    seen = asyncio.run(scenario())
    assert (seen["completed"].state, seen["completed"].taken) == ("completed", False)
    assert (seen["alive"].in_flight, seen["alive"].taken) == (True, False)
    suspect = seen["suspect"]
    assert (suspect.in_flight, suspect.taken, suspect.generation) == (False, False, 1) and suspect.owner
    assert not seen["stale"].taken
    assert sorted(t.taken for t in seen["race"]) == [False, True]
    winner = next(j for j, t in zip(("first", "second"), seen["race"]) if t.taken)
    assert seen["after-late-sender"] == [("pending", seen["lease-" + winner])]  # still the winner's, in flight
    # the loser's look may predate the winner's commit (it saw the dead sender): it waits and looks
    # again either way, and then sees the winner in flight, as the fail-policy sidecar does below
    assert seen["fail-policy"].in_flight and not seen["fail-policy"].taken
    assert sql(fresh_dsn, "SELECT state, response_body FROM durable_steps WHERE run_id = 'tk' AND fingerprint = 'v1:done'") == [
        ("completed", b"paid")
    ]
