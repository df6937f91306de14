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
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
from collections import OrderedDict

logger = logging.getLogger("durable")

KEPT = 100_000  # (run, attempt) pairs whose first start is remembered


def _proc_address(host: str, port: int) -> tuple[str, str]:
    """(host, port) as /proc/net/tcp or tcp6 spells a socket's address, and which of the two files."""
    ip = ipaddress.ip_address(host.split("%")[0])
    if isinstance(ip, ipaddress.IPv4Address):
        return f"{int.from_bytes(ip.packed, 'little'):08X}:{port:04X}", "tcp"
    words = [int.from_bytes(ip.packed[i : i + 4], "little") for i in range(0, 16, 4)]
    return "".join(f"{w:08X}" for w in words) + f":{port:04X}", "tcp6"


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


def owner(inode: int, proc: str = "/proc") -> int | None:
    """The pid of a process holding the socket `inode` open."""
    target = f"socket:[{inode}]"
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            for fd in os.listdir(f"{proc}/{name}/fd"):
                if os.readlink(f"{proc}/{name}/fd/{fd}") == target:
                    return int(name)
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return None


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
        inode = socket_inode(peer, local)
        pid = owner(inode) if inode else None
        return start_of(pid) if pid else None
    except ValueError:  # not an IP address (a unix socket, say)
        return None


class Starts:
    """Binds each (run, attempt) to the first start of the agent seen using it; a later start with
    the same ids is served as an attempt of its own, `ATTEMPT@<8 hex of its start>`."""

    def __init__(self) -> None:
        self._first: OrderedDict[tuple[str, str], str] = OrderedDict()

    def attempt(self, run: str, attempt: str, start: str) -> str:
        first = self._first.setdefault((run, attempt), start)
        self._first.move_to_end((run, attempt))
        while len(self._first) > KEPT:
            self._first.popitem(last=False)
        if first == start:
            return attempt
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
