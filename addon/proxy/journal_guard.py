"""The journal's own PostgreSQL is never a destination of the proxy, however it is spelt.

A client that may use the proxy must not reach the database behind it: through a CONNECT tunnel
with raw TCP it could speak PostgreSQL's protocol to it. Comparing host names misses the many
spellings of one address (`127.1`, `2130706433`, `0x7f000001`, `0.0.0.0`, `[::ffff:127.0.0.1]`,
a name that resolves there). So the destination is compared as addresses: its literal forms
(inet_aton's short, decimal, octal and hex ones; IPv4-mapped IPv6) or what its name resolves to,
against what the journal's host resolves to. A journal on this host (loopback, or a unix socket,
as the embedded one) is reached by every loopback address and the unspecified one, all of which
are refused on its port. Names are resolved only for the journal's port, so other requests cost
nothing. The check runs before any connection is opened: on CONNECT, on each request, and in
mitmproxy's server_connect hook, which every upstream connection passes (transparent mode, raw TCP).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
from dataclasses import dataclass

from psycopg.conninfo import conninfo_to_dict

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
REASON = "the journal's own database is not a destination of this proxy"


@dataclass(frozen=True)
class Server:
    """Where the journal's PostgreSQL listens: its port, its addresses, and whether it is on this host."""

    port: int
    addresses: frozenset[Address]
    local: bool


@functools.lru_cache(maxsize=4)
def journal_server(dsn: str) -> Server:
    """Parsed and resolved once per DSN, not per request."""
    parts = conninfo_to_dict(dsn)
    host = str(parts.get("hostaddr") or parts.get("host") or "")
    port = int(str(parts.get("port") or 5432).split(",")[0])
    if not host or host.startswith("/"):  # a unix socket: a server on this host
        return Server(port, frozenset(), True)
    addresses = frozenset(_resolve_now(host.split(",")[0]))
    return Server(port, addresses, any(_local(a) for a in addresses))


def literal(host: str) -> frozenset[Address] | None:
    """The addresses a host spelt as an address names (None: a name, to be resolved)."""
    host = host.strip("[]").split("%")[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            ip = ipaddress.IPv4Address(socket.inet_aton(host))  # 127.1, 2130706433, 0x7f000001, 0177.1
        except OSError:
            return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return frozenset({ip, ip.ipv4_mapped})
    return frozenset({ip})


async def reaches(host: str, port: int, dsn: str | None) -> bool:
    """Would a connection to (host, port) reach the journal's server?"""
    if dsn is None:
        return False
    server = journal_server(dsn)
    if port != server.port:
        return False
    addresses = literal(host)
    if addresses is None:
        try:
            addresses = frozenset(await asyncio.to_thread(_resolve_now, host))
        except OSError:
            return False  # a name that resolves nowhere reaches nothing
    return any(a in server.addresses or (server.local and _local(a)) for a in addresses)


def this_host(host: str) -> bool:
    """Does a destination spelt `host` name this host (a loopback or the unspecified address, however
    spelt, or `localhost`)? Not resolved: a sidecar's own ports are reached by these names."""
    addresses = literal(host)
    return host.lower().rstrip(".") == "localhost" or (addresses is not None and any(_local(a) for a in addresses))


def loopback(host: str) -> bool:
    """Is this client address this host's loopback (IPv4-mapped included: `literal` adds the IPv4 form)?"""
    addresses = literal(host)
    return addresses is not None and any(a.is_loopback for a in addresses)


def _local(address: Address) -> bool:
    """An address that reaches this host's own servers from this host (of `literal`'s sets, which
    hold an IPv4-mapped address's IPv4 form too)."""
    return address.is_loopback or address.is_unspecified


def _resolve_now(host: str) -> set[Address]:
    found: set[Address] = set()
    for *_, sockaddr in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP):
        found |= literal(str(sockaddr[0])) or set()
    return found
