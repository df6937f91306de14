"""Which start of the agent a client connection comes from, when the agent runs on this host.

An attempt id names one life of the agent, but nothing stops a user from starting the agent again
with the same one (the exported proxy variables of `durable env`, then up-arrow and Enter): its
calls would be new occurrences of the old attempt, recorded and paid again. When the agent's socket
is visible here (same host, or a pod sharing its process namespace), the sidecar finds the process
that owns it (`/proc/net/tcp*` gives the socket's inode, `/proc/PID/fd` its owner) and names the
*start* it belongs to: the owner's process group and the start time of that group's leader.

The unit is the process group, never the process: a shell script calling curl five times, a
multiprocessing pool or a Node parent with its workers all share the group their first process was
started in, so they are one start. An interactive shell gives each command line a group of its own,
and a restarted container gives its PID 1 a new start time, so those are new starts. A group whose
leader has exited is named by its id alone. Where the socket is not visible (another host, another
network namespace) there is no start, and the attempt id is taken as given.

Another start is a *new* start only when no process of the first one is alive any more (the agent
crashed and was run again): a worker that outlives its group's leader, or one a live agent started
in a session of its own (`setsid`), is part of the live attempt, never a second start replaying it.

Finding a socket's owner reads processes' fd tables; the owners seen lately are read first, so an
agent's next connection costs one process's table, not every process's on the host.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import socket
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable

logger = logging.getLogger("durable")

KEPT = 100_000  # (run, attempt) pairs whose first start is remembered
RECENT = 32  # owners of agents' sockets remembered, read first
NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY = 4, 20  # linux/netlink.h, linux/sock_diag.h


def _proc_address(host: str, port: int) -> tuple[str, str]:
    """(host, port) as /proc/net/tcp or tcp6 spells a socket's address, and which of the two files."""
    ip = ipaddress.ip_address(host.split("%")[0])
    if isinstance(ip, ipaddress.IPv4Address):
        return f"{int.from_bytes(ip.packed, 'little'):08X}:{port:04X}", "tcp"
    words = [int.from_bytes(ip.packed[i : i + 4], "little") for i in range(0, 16, 4)]
    return "".join(f"{w:08X}" for w in words) + f":{port:04X}", "tcp6"


def diag_inode(peer: tuple, local: tuple) -> int | None:
    """The inode of the agent's socket asked of the kernel by its four addresses (netlink sock_diag,
    one exact lookup) instead of read out of every TCP socket's line in /proc/net/tcp, which costs
    milliseconds on a busy host. None where netlink is not there (not Linux) or finds nothing."""
    hosts = [ipaddress.ip_address(h.split("%")[0]) for h in (peer[0], local[0])]
    hosts = [h.ipv4_mapped or h if isinstance(h, ipaddress.IPv6Address) else h for h in hosts]
    family = socket.AF_INET if all(isinstance(h, ipaddress.IPv4Address) for h in hosts) else socket.AF_INET6
    if family == socket.AF_INET6:
        hosts = [ipaddress.IPv6Address(f"::ffff:{h}") if isinstance(h, ipaddress.IPv4Address) else h for h in hosts]
    sockid = struct.pack("!HH16s16s", peer[1], local[1], *(h.packed.ljust(16, b"\0") for h in hosts))
    sockid += struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF)  # any interface, no cookie
    request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid  # every TCP state
    header = struct.pack("=IHHII", 16 + len(request), SOCK_DIAG_BY_FAMILY, 1, 1, 0)  # NLM_F_REQUEST
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as diag:
            diag.settimeout(1.0)
            diag.sendto(header + request, (0, 0))
            reply = diag.recv(65536)
    except (OSError, AttributeError):  # no netlink here (AttributeError: not Linux)
        return None
    if len(reply) < 88 or struct.unpack_from("=H", reply, 4)[0] != SOCK_DIAG_BY_FAMILY:
        return None  # an error message: no such socket
    return int(struct.unpack_from("=I", reply, 16 + 68)[0]) or None  # inet_diag_msg's idiag_inode


def socket_inode(peer: tuple, local: tuple, proc: str = "/proc") -> int | None:
    """The inode of the agent's socket: the one whose own address is `peer` and whose remote is `local`."""
    mine, table = _proc_address(peer[0], peer[1])
    theirs, _ = _proc_address(local[0], local[1])
    try:
        with open(f"{proc}/net/{table}") as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[1] == mine and fields[2] == theirs:
                    return int(fields[9])
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    return None


class Owners:
    """The owners of agents' sockets seen lately, most recent first: an agent's next connection is
    most likely opened by a process that opened one before."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # looked up in worker threads
        self._recent: OrderedDict[str, None] = OrderedDict()

    def likely(self) -> list[str]:
        with self._lock:
            return list(reversed(self._recent))

    def seen(self, pid: str) -> None:
        with self._lock:
            self._recent[pid] = None
            self._recent.move_to_end(pid)
            while len(self._recent) > RECENT:
                self._recent.popitem(last=False)


OWNERS = Owners()


def owner(inode: int, proc: str = "/proc", owners: Owners | None = None) -> int | None:
    """The pid of a process holding the socket `inode` open: the recent owners' tables first."""
    owners = owners or OWNERS
    target = f"socket:[{inode}]"
    likely = owners.likely()
    found = next((pid for pid in likely if _holds(pid, target, proc)), None)
    if found is None:
        others = (n for n in os.listdir(proc) if n.isdigit() and n not in likely)
        found = next((pid for pid in others if _holds(pid, target, proc)), None)
    if found is None:
        return None
    owners.seen(found)
    return int(found)


def _holds(pid: str, target: str, proc: str) -> bool:
    try:
        return any(os.readlink(f"{proc}/{pid}/fd/{fd}") == target for fd in os.listdir(f"{proc}/{pid}/fd"))
    except OSError:
        return False  # gone meanwhile, or not ours to read


def group_alive(start: str, proc: str = "/proc") -> bool:
    """Is a process of this start (`PGID.LEADER_START` or `PGID`) still running? Its leader, with
    that start time, or any live member of its process group."""
    pgid, _, started = start.partition(".")
    leader = _stat(int(pgid), proc)
    if leader is not None and (not started or leader[19] == started) and leader[0] != "Z":
        return True
    for name in os.listdir(proc):
        if name.isdigit():
            fields = _stat(int(name), proc)
            if fields is not None and fields[2] == pgid and fields[0] != "Z":
                return True
    return False


def _stat(pid: int, proc: str) -> list[str] | None:
    try:
        with open(f"{proc}/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # the fields after the command name (which may hold spaces)


def start_of(pid: int, proc: str = "/proc") -> str | None:
    """`PGID.LEADER_START`: the process group of `pid` and the start time of its leader (clock ticks
    since boot); `PGID` alone when the leader has exited."""
    fields = _stat(pid, proc)
    if fields is None:
        return None
    pgid = int(fields[2])  # after the name: state, ppid, pgrp
    leader = _stat(pgid, proc)
    if leader is not None and int(leader[2]) == pgid:
        return f"{pgid}.{leader[19]}"  # starttime, field 22 of stat
    return str(pgid)


def start_of_connection(peer: tuple | None, local: tuple | None) -> str | None:
    if not peer or not local:
        return None
    try:
        inode = diag_inode(peer, local) or socket_inode(peer, local)
        pid = owner(inode) if inode else None
        return start_of(pid) if pid else None
    except ValueError:  # not an IP address (a unix socket, say)
        return None


class Starts:
    """Binds each (run, attempt) to the first start of the agent seen using it; a later start with
    the same ids, once no process of the first is alive, is served as an attempt of its own,
    `ATTEMPT@<8 hex of its start>`. While one is, the later start is part of it (a worker)."""

    def __init__(self, alive: Callable[[str], bool] = group_alive) -> None:
        self._first: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._decided: OrderedDict[tuple[str, str, str], str] = OrderedDict()  # a later start's attempt
        self._alive = alive

    def attempt(self, run: str, attempt: str, start: str) -> str:
        first = self._first.setdefault((run, attempt), start)
        self._first.move_to_end((run, attempt))
        while len(self._first) > KEPT:
            self._first.popitem(last=False)
        if first == start:
            return attempt
        decided = self._decided.get((run, attempt, start))
        if decided is None:
            decided = attempt if self._alive(first) else self._second_start(run, attempt, start)
            self._decided[(run, attempt, start)] = decided
            while len(self._decided) > KEPT:
                self._decided.popitem(last=False)
        return decided

    def _second_start(self, run: str, attempt: str, start: str) -> str:
        derived = f"{attempt[:119]}@{hashlib.sha256(start.encode()).hexdigest()[:8]}"  # ids stay <= 128
        if (run, derived) not in self._first:
            self._first[(run, derived)] = start
            logger.warning(
                "durable: run %s: attempt %s is used by a second start of the agent (process group %s): served "
                "as attempt %s, which replays the run from its start instead of paying for its calls again",
                run,
                attempt,
                start.split(".")[0],
                derived,
            )
        return derived
