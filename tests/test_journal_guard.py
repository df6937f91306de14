"""journal_guard.py: the journal's own PostgreSQL by any spelling (pure logic), and the hook that
stops every upstream connection to it (mitmproxy's server_connect: transparent mode, raw TCP)."""

from __future__ import annotations

import asyncio
import ipaddress
from types import SimpleNamespace

import pytest
from inprocess import sidecar
from psycopg.conninfo import conninfo_to_dict

from durable_sidecar.proxy import journal_guard

LOCAL = "host=127.0.0.1 port=6543 dbname=x"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1", "2130706433", "0x7f000001", "0177.0.0.1", "0.0.0.0",
                                  "127.9.9.9", "localhost", "::1", "[::ffff:127.0.0.1]", "::ffff:7f00:1", "::"])
def test_every_spelling_of_a_local_journal_is_refused_on_its_port(host: str) -> None:
    assert asyncio.run(journal_guard.reaches(host, 6543, LOCAL))
    assert not asyncio.run(journal_guard.reaches(host, 6544, LOCAL))  # another port: any service may be there


def test_other_hosts_pass_and_a_remote_journal_is_matched_by_address() -> None:
    assert not asyncio.run(journal_guard.reaches("10.1.2.3", 6543, LOCAL))
    remote = "host=10.1.2.3 port=5432"
    assert asyncio.run(journal_guard.reaches("0x0a010203", 5432, remote))
    assert not asyncio.run(journal_guard.reaches("127.0.0.1", 5432, remote))  # not where that journal is
    assert asyncio.run(journal_guard.reaches("127.0.0.1", 5432, "host=/tmp/pgdata port=5432"))  # a unix socket: local
    assert not asyncio.run(journal_guard.reaches("127.0.0.1", 5432, None))
    assert journal_guard.literal("example.invalid") is None
    assert journal_guard.literal("127.1") == frozenset({ipaddress.IPv4Address("127.0.0.1")})


def test_an_upstream_connection_to_the_journal_is_killed_before_it_opens(pg_dsn: str) -> None:
    port = int(conninfo_to_dict(pg_dsn).get("port") or 5432)

    async def scenario() -> list:
        async with sidecar(pg_dsn) as addon:
            found = []
            for address in (("0x7f000001", port), ("127.0.0.1", port + 1)):
                data = SimpleNamespace(server=SimpleNamespace(address=address, error=None),
                                       client=SimpleNamespace(peername=("127.0.0.1", 50000)))
                await addon.server_connect(data)
                found.append(data.server.error)
            return found

    assert asyncio.run(scenario()) == [journal_guard.REASON, None]
