"""The lease (store/lease.py) on a real PostgreSQL: the advisory lock that says a sidecar is alive,
as other sidecars read it (`LIVE`: the leases held and one's generation), held through idle timeouts, re-taken under the
same id with a new generation when its session is ended, and given up at once on close."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest
from conftest import sql

from durable_sidecar.store import lease as lease_module
from durable_sidecar.store.journal import Journal
from durable_sidecar.store.lease import CLASS, LIVE, Lease


@pytest.fixture
def dsn(fresh_dsn: str) -> str:
    async def migrate() -> None:
        journal = Journal(fresh_dsn)
        await journal.open()  # applies the migrations (durable_leases)
        await journal.close()

    asyncio.run(migrate())
    return fresh_dsn


def alive(dsn: str, owner: int) -> bool:
    """What another sidecar's statements see of lease `owner`."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return looks_alive(conn, owner)


def looks_alive(conn: psycopg.Connection, owner: int) -> bool:
    return owner in conn.execute(LIVE, {"lease": owner}).fetchone()[0]


def generation(dsn: str, owner: int) -> int | None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(LIVE, {"lease": owner}).fetchone()[1]


def test_a_held_lease_is_seen_alive_under_its_own_id_and_generation(dsn: str) -> None:
    async def scenario() -> None:
        first, second = Lease(), Lease()
        try:
            a, b = await first.ensure(dsn, 5), await second.ensure(dsn, 5)
            assert a != b and a > 0 and b > 0 and first.held and second.held
            assert await first.ensure(dsn, 5) == a  # held: the same id, no new take
            assert alive(dsn, a) and alive(dsn, b) and not alive(dsn, a + b)
            assert generation(dsn, a) == first.generation == 1 and generation(dsn, a + b) is None
            locks = sql(
                dsn,
                "SELECT classid, objid, objsubid FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            assert (CLASS, a, 2) in locks
        finally:
            await first.close()
            await second.close()

    asyncio.run(scenario())


def test_a_closed_lease_is_dead_at_once(dsn: str) -> None:
    """close() releases the lock itself, before it closes the session: the server drops a closed
    session's locks a moment later, and a take-over in that moment would find the step's sender
    still alive. Seen from another connection just as the session is about to close."""
    with psycopg.connect(dsn, autocommit=True) as other_sidecar:
        seen: list[bool] = []

        async def scenario() -> None:
            lease = Lease()
            owner = await lease.ensure(dsn, 5)
            conn = lease._conn
            assert conn is not None
            close_session = conn.close

            async def close_and_look() -> None:
                seen.append(looks_alive(other_sidecar, owner))
                await close_session()

            conn.close = close_and_look  # type: ignore[method-assign]
            await lease.close()
            seen.append(looks_alive(other_sidecar, owner))
            assert not lease.held

        asyncio.run(scenario())
        assert seen == [False, False]


def test_a_lock_of_another_class_or_database_is_not_a_lease(dsn: str, pg_server: str) -> None:
    """Citus, PgBouncer and other tools take advisory locks of their own: only this class, with two
    int keys, in this database, counts."""
    with psycopg.connect(pg_server, autocommit=True) as elsewhere, psycopg.connect(dsn, autocommit=True) as here:
        elsewhere.execute("SELECT pg_advisory_lock(%s, %s)", (CLASS, 4242))  # the same key, another database
        here.execute("SELECT pg_advisory_lock(%s, %s)", (CLASS + 1, 4343))  # another class
        here.execute("SELECT pg_advisory_lock(%s)", ((CLASS << 32) | 4444,))  # one bigint key
        assert not alive(dsn, 4242) and not alive(dsn, 4343) and not alive(dsn, 4444)
        here.execute("SELECT pg_advisory_lock(%s, %s)", (CLASS, 4545))
        assert alive(dsn, 4545)


def test_a_lease_outlives_the_databases_idle_session_timeout(dsn: str) -> None:
    """A managed PostgreSQL ends idle sessions; the lease's session turns that off for itself."""
    database = sql(dsn, "SELECT current_database()")[0][0]
    sql(dsn, f"ALTER DATABASE \"{database}\" SET idle_session_timeout = '1s'")

    async def scenario() -> tuple[int, int, bool]:
        lease = Lease()
        try:
            owner = await lease.ensure(dsn, 5)
            await asyncio.sleep(3)  # three idle timeouts; the heartbeat's SELECT 1 comes every second
            return owner, lease.generation, lease.held
        finally:
            await lease.close()

    owner, taken, held = asyncio.run(scenario())
    assert held and taken == 1 and generation(dsn, owner) == 1  # never lost and re-taken


def test_a_lease_whose_session_is_ended_is_taken_again_with_the_same_id(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Ended after a few quiet heartbeats (the keeper keeps watching), with a one-second deadline
    (the retake's own bound leaves it its second); the operator reads both events in the log."""

    async def scenario() -> int:
        lease = Lease()
        try:
            owner = await lease.ensure(dsn, 1)
            await asyncio.sleep(2.5)  # two heartbeats answered first
            sql(
                dsn,
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'"
                " AND classid = %s AND objid = %s",
                CLASS,
                owner,
            )
            deadline = time.monotonic() + 10
            retaken = f"durable: lease {owner} taken again (generation 2)"
            # held is set inside the take; the keeper logs once its deadline wrapper hands back: wait for both
            while time.monotonic() < deadline and not (
                lease.held and lease.generation == 2 and retaken in [r.getMessage() for r in caplog.records]
            ):
                await asyncio.sleep(0.1)
            assert lease.id == owner and lease.generation == 2 and lease.held
            assert alive(dsn, owner) and generation(dsn, owner) == 2
            return owner
        finally:
            await lease.close()

    with caplog.at_level("WARNING", logger="durable"):
        owner = asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        m.startswith(f"durable: lease {owner} lost with its connection (") and m.endswith("); taking it again")
        for m in messages
    ), messages
    assert f"durable: lease {owner} taken again (generation 2)" in messages


def test_an_id_whose_old_session_is_ending_is_taken_again_once_it_has(dsn: str) -> None:
    """A lost lease re-takes its own id (its steps name it), waiting for the old session to end."""
    holder = psycopg.connect(dsn, autocommit=True)
    holder.execute("SELECT pg_advisory_lock(%s, %s)", (CLASS, 778))

    async def scenario() -> None:
        lease = Lease()
        lease.id = 778
        asyncio.get_running_loop().call_later(0.5, holder.close)
        try:
            assert await lease.ensure(dsn, 5) == 778 and lease.held
        finally:
            await lease.close()

    asyncio.run(scenario())


def test_an_id_still_held_elsewhere_is_not_taken_again(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two sidecars never share an id: a lease whose old session still holds its id waits, then
    reports the lease lost rather than taking another id under the steps it owns."""
    monkeypatch.setattr(lease_module.asyncio, "sleep", _no_wait)
    with psycopg.connect(dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s, %s)", (CLASS, 777))

        async def scenario() -> None:
            lease = Lease()
            lease.id = 777
            with pytest.raises(
                lease_module.LeaseLost, match="^could not take lease 777 again: its old session still holds it$"
            ):
                await lease.ensure(dsn, 5)
            assert lease.id == 777 and not lease.held

        asyncio.run(scenario())


_real_sleep = asyncio.sleep


async def _no_wait(seconds: float) -> None:
    await _real_sleep(0)


def test_the_lease_class_never_changes() -> None:
    """During a rolling upgrade sidecars of two versions share one journal and must see each other's
    leases: the advisory-lock class is part of the journal's contract, like its schema."""
    assert CLASS == 0x6475  # "du"


def test_a_lease_lost_while_the_database_refuses_connections_is_taken_again_when_it_accepts(
    dsn: str, pg_server: str
) -> None:
    """A failover or restart: the lease's session ends and new connections are refused for a while.
    The keeper keeps trying every RETAKE_S and takes the same id again once the database is back."""
    database = sql(dsn, "SELECT current_database()")[0][0]

    async def scenario() -> None:
        lease = Lease()
        try:
            owner = await lease.ensure(dsn, 2)
            sql(pg_server, f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
            sql(pg_server, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", database)
            await asyncio.sleep(3)  # a heartbeat to notice, then a few refused tries
            assert not lease.held  # refused meanwhile
            sql(pg_server, f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not lease.held:
                await asyncio.sleep(0.1)
            assert lease.held and lease.id == owner and lease.generation == 2
        finally:
            sql(pg_server, f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
            await lease.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(("drawn", "expected"), [(0, 1), ("top", 2**31 - 2)])
def test_lease_ids_span_every_positive_int4_but_the_top(
    dsn: str, monkeypatch: pytest.MonkeyPatch, drawn: int | str, expected: int
) -> None:
    """An id is a step's `owner` (an integer column) and an advisory-lock key: never 0 (never held),
    never past PostgreSQL's integer. Both ends of the random draw are taken, with those ids."""
    monkeypatch.setattr(lease_module.secrets, "randbelow", lambda n: n - 1 if drawn == "top" else drawn)

    async def scenario() -> int:
        lease = Lease()
        try:
            return await lease.ensure(dsn, 1)  # a short deadline still leaves the take its second
        finally:
            await lease.close()

    assert asyncio.run(scenario()) == expected
    assert generation(dsn, expected) == 1


def test_lease_ids_are_drawn_from_the_whole_range(dsn: str) -> None:
    async def scenario() -> list[int]:
        leases = [Lease() for _ in range(3)]
        try:
            return [await lease.ensure(dsn, 5) for lease in leases]
        finally:
            for lease in leases:
                await lease.close()

    assert max(asyncio.run(scenario())) > 1000  # 3 draws all under 1,000 of 2^31: about 1e-20
