"""The journal's own statements on a real PostgreSQL, in process (no sidecar, no proxy): what each
statement leaves in the tables and how PostgreSQL plans it. Quick enough to be the journal's first
tier of tests in scripts/mutate.sh; the database's life cycle (embedded default, failing closed,
layouts) is in test_journal_db.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any

import psycopg
import pytest

from durable_sidecar.store.cursor import RunCursor, StepRef, digest
from durable_sidecar.store.journal import _COMPLETE, INDEX, Journal, JournalError, NewStep, TakeOver
from durable_sidecar.store.migrations import MIGRATIONS
from conftest import on_citus, sql
from durable_sidecar.tools.launcher import free_port


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
    if on_citus(fresh_dsn):  # the worker plans a plain query for all of the run: a sort of stored digests
        assert "Task Count: 1" in plan and "sha256" not in plan and "durable_digest" not in plan, plan
        return
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
    if on_citus(fresh_dsn):
        pytest.skip("a Citus shard's index statistics are on its worker; the statement on it is the same")

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
    from durable_sidecar.store.execution import JournalError, Statement

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


# -- upkeep, imports and the journal's connections ---------------------------------------------


async def opened(dsn: str, **kwargs: Any) -> Journal:
    journal = Journal(dsn, **kwargs)
    await journal.open()
    return journal


def record_one(dsn: str, run: str, options: dict[str, Any] | None = None, **fields: Any) -> None:
    """Journal one pending step of `run` with `fields` (through a Journal made with `options`), and
    close: for tests that read back what was stored."""

    async def scenario() -> None:
        journal = await opened(dsn, **(options or {}))
        try:
            owner = await journal.owner()
            assert await journal.record(bare_step(run, "v1:a", owner=owner, **fields)) is not None
        finally:
            await journal.close()

    asyncio.run(scenario())


def counted(journal: Journal) -> list[tuple[str, float, bool]]:
    """What the journal's metrics hook hears from now on: (statement, seconds, answered)."""
    seen: list[tuple[str, float, bool]] = []
    journal.observe = lambda what, seconds, ok: seen.append((what, seconds, ok))
    return seen


def test_gc_deletes_only_runs_idle_past_the_age_a_batch_at_a_time(fresh_dsn: str) -> None:
    """Idle: the run untouched and none of its steps started, answered or replayed within the age."""

    async def collect() -> int:
        journal = await opened(fresh_dsn)
        try:
            for run in ("old-1", "old-2", "old-3", "old-replayed", "fresh"):
                await journal.record(bare_step(run, "v1:k"))
            sql(fresh_dsn, "UPDATE durable_runs SET updated_at = now() - interval '2 hours' WHERE id LIKE 'old-%%'")
            sql(fresh_dsn, "UPDATE durable_steps SET started_at = now() - interval '2 hours' WHERE run_id LIKE 'old-%%'")
            sql(fresh_dsn, "UPDATE durable_steps SET replayed_at = now() WHERE run_id = 'old-replayed'")
            return await journal.gc(3600, batch=2)
        finally:
            await journal.close()

    assert asyncio.run(collect()) == 3
    assert sql(fresh_dsn, "SELECT id FROM durable_runs ORDER BY id") == [("fresh",), ("old-replayed",)]
    assert sql(fresh_dsn, "SELECT DISTINCT run_id FROM durable_steps ORDER BY 1") == [("fresh",), ("old-replayed",)]


def test_an_import_is_one_run_of_completed_steps_or_nothing(pg_dsn: str) -> None:
    from durable_sidecar.store.journal import Answer

    run = f"imp-{time.monotonic_ns()}"
    answer = Answer(201, "Created", "HTTP/1.1", [["content-type", "application/json"]], b'{"ok": true}')

    async def load(keys: list[str]) -> int:
        journal = await opened(pg_dsn)
        try:
            return await journal.import_steps(run, [(bare_step(run, key, outcome="imported"), answer) for key in keys])
        finally:
            await journal.close()

    assert asyncio.run(load(["v1:a", "v1:b"])) == 2
    rows = "SELECT seq, state, status, reason, response_body, last_outcome FROM durable_steps WHERE run_id = %s ORDER BY seq"
    expected = [(n, "completed", 201, "Created", b'{"ok": true}', "imported") for n in (1, 2)]
    assert sql(pg_dsn, rows, run) == expected
    assert sql(pg_dsn, "SELECT last_seq FROM durable_runs WHERE id = %s", run) == [(2,)]
    imported = "SELECT DISTINCT duration_ms, completed_at IS NOT NULL FROM durable_steps WHERE run_id = %s"
    assert sql(pg_dsn, imported, run) == [(0.0, True)]
    with pytest.raises(JournalError, match="^import run: "):
        asyncio.run(load(["v1:c", "v1:c"]))  # the same step twice: the whole import fails...
    assert sql(pg_dsn, rows, run) == expected  # ...and leaves nothing of itself
    assert sql(pg_dsn, "SELECT last_seq FROM durable_runs WHERE id = %s", run) == [(2,)]


def test_replays_are_counted_in_one_batch_and_pushes_append_only_to_completed_answers(pg_dsn: str) -> None:
    run = f"counted-{time.monotonic_ns()}"

    async def scenario() -> None:
        journal = await opened(pg_dsn)
        try:
            owner = await journal.owner()
            done = await journal.record(bare_step(run, "v1:a", owner=owner))
            open_ = await journal.record(bare_step(run, "v1:b", owner=owner))
            assert done is not None and open_ is not None
            await journal.complete(run, done.seq, "completed", 200, "OK", "HTTP/1.1", [], b"first", 1.0, owner=owner)
            for attempt in ("a2", "a3"):
                journal.note_replay(run, done.seq, attempt)
            journal.note_replay(run, open_.seq, "a2")
            await journal.flush_replays()
            await journal.append_answer(run, done.seq, b"first+push")
            await journal.append_answer(run, open_.seq, b"not an answer")
        finally:
            await journal.close()

    asyncio.run(scenario())
    rows = sql(pg_dsn, "SELECT seq, replay_count, replayed_at IS NOT NULL, last_attempt, last_outcome, response_body"
                       " FROM durable_steps WHERE run_id = %s ORDER BY seq", run)
    assert rows == [(1, 2, True, "a3", "replayed", b"first+push"), (2, 1, True, "a2", "replayed", None)]


def test_a_step_never_sent_is_handed_back_only_by_its_owner_and_its_state_names_who_has_it(pg_dsn: str) -> None:
    run = f"owned-{time.monotonic_ns()}"

    async def scenario() -> None:
        mine, theirs = await opened(pg_dsn), await opened(pg_dsn)
        try:
            me, them = await mine.owner(), await theirs.owner()
            assert me != them
            ref = await mine.record(bare_step(run, "v1:a", owner=them))
            assert ref is not None
            step = StepRef(ref.seq, "v1:a", 0, "pending")
            seen = await mine.take_over(run, step, "a2", True, 60.0)
            assert (seen.state, seen.in_flight, seen.taken, seen.owner) == ("pending", True, False, them)
            seen = await theirs.take_over(run, step, "a2", False, 60.0)  # its own, but the policy keeps it
            assert (seen.state, seen.in_flight, seen.taken, seen.owner) == ("pending", False, False, None)
            await mine.give_back(run, "v1:a", 0, me)  # not the owner: nothing changes
            assert sql(pg_dsn, "SELECT owner, approved FROM durable_steps WHERE run_id = %s", run) == [(them, False)]
            await theirs.give_back(run, "v1:a", 0, them)
            assert sql(pg_dsn, "SELECT owner, approved FROM durable_steps WHERE run_id = %s", run) == [(None, True)]
            seen = await mine.take_over(run, step, "a2", False, 60.0)  # nobody's, approved: mine now
            assert (seen.state, seen.in_flight, seen.taken, seen.owner) == ("pending", False, True, None)
            seen = await mine.take_over(run, StepRef(ref.seq, "v1:other", 0, "pending"), "a2", True, 60.0)
            assert seen == TakeOver(None, False, False)
        finally:
            await mine.close()
            await theirs.close()

    asyncio.run(scenario())


def test_statements_go_on_after_postgresql_ends_the_journals_sessions(pg_dsn: str) -> None:
    """pg_terminate_backend on every session of the sidecar (pool and lease): the next statements
    find their connection broken, take a new one and answer; the lease is taken again."""
    run = f"ended-{time.monotonic_ns()}"

    async def scenario() -> None:
        journal = await opened(pg_dsn)
        try:
            owner = await journal.owner()
            first = await journal.record(bare_step(run, "v1:a", owner=owner))
            assert first is not None
            ended = sql(pg_dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                " WHERE datname = current_database() AND pid <> pg_backend_pid()")
            assert len(ended) >= 2  # a pooled connection and the lease's at least
            assert await journal.find(run, "v1:a", 0) == StepRef(first.seq, "v1:a", 0, "pending")
            again = await journal.owner()
            second = await journal.record(bare_step(run, "v1:b", owner=again))
            assert second is not None and second.seq == first.seq + 1
        finally:
            await journal.close()

    asyncio.run(scenario())


def test_a_statement_that_gets_no_answer_in_time_fails_and_the_next_one_answers(pg_dsn: str) -> None:
    """A lock held elsewhere stands for a frozen link: the write waits, and after durable_db_timeout
    the agent's call is refused (JournalTimeout) instead of hanging; the stuck connection is thrown
    away, so the journal answers again as soon as the lock goes."""
    from durable_sidecar.store.execution import JournalTimeout

    run = f"frozen-{time.monotonic_ns()}"

    async def scenario() -> None:
        journal = await opened(pg_dsn, timeout_s=0.5)
        seen = counted(journal)
        try:
            owner = await journal.owner()
            assert await journal.record(bare_step(run, "v1:a", owner=owner)) is not None
            with psycopg.connect(pg_dsn) as blocker:
                blocker.execute("SELECT 1 FROM durable_runs WHERE id = %s FOR UPDATE", (run,))
                started = time.monotonic()
                with pytest.raises(JournalTimeout, match="^no answer from the journal within durable_db_timeout"):
                    await journal.record(bare_step(run, "v1:b", owner=owner))
                assert time.monotonic() - started < 5
            assert await journal.record(bare_step(run, "v1:c", owner=owner)) is not None
            assert ("record pending step", 0.0, False) in seen  # the stuck write counted as a failure, with no time
        finally:
            await journal.close()

    asyncio.run(scenario())


def test_headers_round_trip_byte_for_byte_nul_bytes_included(pg_dsn: str) -> None:
    """jsonb cannot hold U+0000: a pair with a NUL byte goes in as base64 (marked), every other pair
    as latin-1 text, and all come back as they were, in order, duplicates kept."""
    from durable_sidecar.store.journal import decode_headers, encode_headers

    fields = [(b"Set-Cookie", b"a=1"), (b"X-Odd", b"nul\0inside"), (b"Set-Cookie", b"b=\xe9")]
    encoded = encode_headers(fields)
    assert encoded == [["Set-Cookie", "a=1"], ["WC1PZGQ=", "bnVsAGluc2lkZQ==", "b64"], ["Set-Cookie", "b=\xe9"]]
    (stored,) = sql(pg_dsn, "SELECT %s::jsonb", psycopg.types.json.Jsonb(encoded))[0]
    assert decode_headers(stored) == fields and decode_headers(None) == []


def test_an_envelope_with_nul_characters_is_journaled_with_them_spelled_out(pg_dsn: str) -> None:
    """A `%00` in a query decodes to U+0000, which jsonb refuses: the envelope (shown, never replayed)
    keeps it as `\\x00`, in strings at any depth; everything else is stored as it came."""
    run = f"nul-{time.monotonic_ns()}"
    envelope = {"path": "/a\0b", "query": [["q", "x\0"], ["n", 1]], "body": {"k": ["\0", None, True]}}

    record_one(pg_dsn, run, envelope=envelope)
    assert sql(pg_dsn, "SELECT envelope FROM durable_steps WHERE run_id = %s", run) == [
        ({"path": "/a\\x00b", "query": [["q", "x\\x00"], ["n", 1]], "body": {"k": ["\\x00", None, True]}},)
    ]


def test_a_failed_statement_names_what_failed(fresh_dsn: str) -> None:
    """An operator reads a journal failure in a 503's `failed` field and in the log: it names the
    statement that failed before what the driver said. The steps table renamed away makes every
    statement fail at once, as a journal whose schema was tampered with would."""
    run = f"named-{time.monotonic_ns()}"

    async def scenario() -> None:
        journal = await opened(fresh_dsn)
        try:
            owner = await journal.owner()
            ref = await journal.record(bare_step(run, "v1:a", owner=owner))
            assert ref is not None
            step = StepRef(ref.seq, "v1:a", 0, "pending")
            await journal.flush_replays()  # nothing gathered yet: returns at once
            sql(fresh_dsn, "ALTER TABLE durable_steps RENAME TO durable_steps_away")
            failing = {
                "record pending step": lambda: journal.record(bare_step(run, "v1:b", owner=owner)),
                "read run version": lambda: journal.fp_version(run),
                "find run": lambda: journal.has_steps(run),
                "find step": lambda: journal.find(run, "v1:a", 0),
                "journal response": lambda: journal.complete(
                    run, ref.seq, "completed", 200, "OK", "HTTP/1.1", [], b"", 1.0, owner=owner),
                "journal server pushes": lambda: journal.append_answer(run, ref.seq, b"push"),
                "journal failure": lambda: journal.fail(run, ref.seq, "reset", 1.0, owner),
                "leave step in doubt": lambda: journal.let_go(run, ref.seq, owner),
                "hand back unsent step": lambda: journal.give_back(run, "v1:a", 0, owner),
                "take over step": lambda: journal.take_over(run, step, "a2", True, 60.0),
                "read journaled responses": lambda: journal.responses(run, [ref.seq]),
                "read journaled requests": lambda: journal.requests(run, [ref.seq]),
                "load run": lambda: journal.load_index(run, RunCursor()),
                "find idle runs": lambda: journal.gc(0),
            }
            for what, statement in failing.items():
                with pytest.raises(JournalError) as failed:
                    await statement()
                assert str(failed.value).startswith(f"{what}: "), what
        finally:
            await journal.close()

    asyncio.run(scenario())


def test_a_sealed_step_read_without_its_key_names_the_run(fresh_dsn: str) -> None:
    """A step journaled under durable_encryption_key and read by a sidecar without that key: the
    error says which run's answers or requests could not be opened (and the answer's is a SealedError,
    which the sidecar turns into its own 503). A database of its own, as for the divergence test below."""
    from durable_sidecar.store.crypto import Keyring, new_key_spec
    from durable_sidecar.store.journal import SealedError

    run = f"sealed-{time.monotonic_ns()}"

    async def scenario() -> None:
        sealed, other = await opened(fresh_dsn, keyring=Keyring(new_key_spec())), await opened(fresh_dsn)
        try:
            owner = await sealed.owner()
            ref = await sealed.record(bare_step(run, "v1:a", owner=owner, request_body=b"secret"))
            assert ref is not None
            await sealed.complete(run, ref.seq, "completed", 200, "OK", "HTTP/1.1", [], b"answer", 1.0, owner=owner)
            with pytest.raises(SealedError, match=f"^read journaled responses of run {run}: "):
                await other.responses(run, [ref.seq])
            with pytest.raises(JournalError, match=f"^read journaled requests of run {run}: "):
                await other.requests(run, [ref.seq])
        finally:
            await sealed.close()
            await other.close()

    asyncio.run(scenario())


def test_a_journal_opens_itself_on_first_use_closes_every_session_and_opens_again(fresh_dsn: str) -> None:
    """No open() needed: the first statement (or the lease) opens the journal. close() ends its
    sessions on the server, pool and lease alike; a statement after it opens a new pool."""
    others = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
              " AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
              " AND application_name NOT LIKE 'citus%%'")  # a Citus coordinator's own sessions

    async def scenario() -> None:
        journal = Journal(fresh_dsn)
        try:
            assert await journal.owner() > 0
            await journal.ping()
            assert sql(fresh_dsn, others)[0][0] >= 2  # a pooled session and the lease's
            await journal.close()
            assert sql(fresh_dsn, others) == [(0,)]
            await journal.ping()
        finally:
            await journal.close()

    asyncio.run(scenario())


def test_the_journals_sessions_keep_a_statement_deadline_and_no_idle_timeout(fresh_dsn: str) -> None:
    """A managed PostgreSQL may end idle sessions (idle_session_timeout): the journal's own sessions
    turn that off, and carry a statement_timeout a second past durable_db_timeout."""
    database_name = sql(fresh_dsn, "SELECT current_database()")[0][0]
    sql(fresh_dsn, f'ALTER DATABASE "{database_name}" SET idle_session_timeout = \'1s\'')

    async def scenario() -> dict[str, str]:
        journal = await opened(fresh_dsn, timeout_s=2.0)
        try:
            return await journal._run(
                "read settings",
                "SELECT current_setting('statement_timeout') AS statement,"
                " current_setting('idle_session_timeout') AS idle,"
                " current_setting('idle_in_transaction_session_timeout') AS idle_in_transaction",
                (),
                fetch="one",
            )
        finally:
            await journal.close()

    assert asyncio.run(scenario()) == {"statement": "3s", "idle": "0", "idle_in_transaction": "0"}


def test_a_journal_that_cannot_be_reached_says_which_step_failed(tmp_path: Any) -> None:
    """No server at the address: taking the lease fails as `take lease: ...` (and is counted as a
    failed journal operation), a health ping as `ping: ...`."""
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"

    async def scenario() -> None:
        journal = Journal(dead, timeout_s=1.0)
        seen = counted(journal)
        try:
            with pytest.raises(JournalError, match="^take lease: "):
                await journal.owner()
            assert ("take lease", 0.0, False) in seen
            with pytest.raises(JournalError, match="^ping: "):
                await journal.ping()
        finally:
            await journal.close()

    asyncio.run(scenario())


def test_a_failed_group_commit_names_how_many_writes_it_held(fresh_dsn: str) -> None:
    """Two writes go at once, each alone; the three queued behind them go together in one
    transaction, and its failure names the batch: `3 journal writes: ...`."""
    run = f"grouped-{time.monotonic_ns()}"

    async def scenario() -> list[str]:
        journal = await opened(fresh_dsn)
        try:
            owner = await journal.owner()
            sql(fresh_dsn, "ALTER TABLE durable_steps RENAME TO durable_steps_away")
            writes = [journal.record(bare_step(run, f"v1:{n}", owner=owner)) for n in range(5)]
            return [str(e).split(":")[0] for e in await asyncio.gather(*writes, return_exceptions=True)]
        finally:
            await journal.close()

    assert asyncio.run(scenario()) == ["record pending step"] * 2 + ["3 journal writes"] * 3


def test_an_answer_keeps_its_trailers_and_flags_and_a_step_not_ours_is_named(pg_dsn: str) -> None:
    """gRPC's status travels in trailers: journaled with the answer, read back with it. An answer
    completed without saying it streamed or was cut short is neither. An answer for a step this
    sidecar does not hold is refused, naming the step."""
    from durable_sidecar.store.journal import NotOurs

    run = f"trailers-{time.monotonic_ns()}"
    trailers = [["grpc-status", "0"], ["grpc-message", "ok"]]

    async def scenario() -> None:
        journal = await opened(pg_dsn)
        try:
            owner = await journal.owner()
            with_trailers = await journal.record(bare_step(run, "v1:a", owner=owner))
            plain = await journal.record(bare_step(run, "v1:b", owner=owner))
            assert with_trailers is not None and plain is not None
            await journal.complete(run, with_trailers.seq, "completed", 200, "OK", "HTTP/2.0", [], b"x", 1.0,
                                   owner=owner, trailers=trailers)
            await journal.complete(run, plain.seq, "completed", 200, "OK", "HTTP/1.1", [], b"y", 1.0, owner=owner)
            stored = await journal.responses(run, [with_trailers.seq, plain.seq])
            assert stored[with_trailers.seq].trailers == [(b"grpc-status", b"0"), (b"grpc-message", b"ok")]
            assert stored[plain.seq].trailers is None
            with pytest.raises(NotOurs, match=f"^journal response: step {run}/99 is gone, answered, or no longer"):
                await journal.complete(run, 99, "completed", 200, "OK", "HTTP/1.1", [], b"", 1.0, owner=owner)
        finally:
            await journal.close()

    asyncio.run(scenario())
    assert sql(pg_dsn, "SELECT DISTINCT streamed, truncated FROM durable_steps WHERE run_id = %s", run) == [
        (False, False)]


def test_each_statement_is_timed_as_it_went(pg_dsn: str) -> None:
    """The metrics hook hears every statement: its name, how long it took, whether it answered
    (a failure is counted with no time)."""

    async def scenario() -> list[tuple[str, float, bool]]:
        journal = await opened(pg_dsn)
        seen = counted(journal)
        try:
            await journal.ping()
            with pytest.raises(JournalError):
                await journal._run("broken statement", "SELECT * FROM no_such_table", ())
        finally:
            await journal.close()
        return seen

    (ping, failed) = asyncio.run(scenario())
    assert ping[0] == "ping" and ping[2] is True and 0 < ping[1] < 30
    assert failed == ("broken statement", 0.0, False)


def test_a_divergences_diff_is_sealed_like_the_body_it_quotes(fresh_dsn: str) -> None:
    """Under durable_encryption_key the diff of a diverged step (which quotes body values) is
    stored sealed, the rest of the divergence as it is, and nothing of the diff in clear. (A
    database of its own: `durable rekey` in test_security.py re-seals every row of the shared one,
    and cannot open rows sealed with a throwaway key.)"""
    from durable_sidecar.store.crypto import Keyring, new_key_spec

    run = f"diverged-{time.monotonic_ns()}"
    divergence = {"nearest": 1, "diff": [{"path": "/card", "was": "4111-old", "now": "4111-new"}]}

    record_one(fresh_dsn, run, {"keyring": Keyring(new_key_spec())}, divergence=divergence)
    ((stored,),) = sql(fresh_dsn, "SELECT divergence FROM durable_steps WHERE run_id = %s", run)
    assert set(stored) == {"nearest", "diff"} and stored["nearest"] == 1
    assert set(stored["diff"]) == {"sealed"} and "4111" not in json.dumps(stored)
