#!/usr/bin/env python3
"""What finding a connection's agent costs (proxy/peers.py), with many other processes on the host.

Starts N idle processes (default 300), then opens connections from this process to a local listener
and times the lookup for each new one, as the sidecar does on an agent's first request on a
connection: as before (the socket found in /proc/net/tcp, then every process's fd table read) and
now (one netlink sock_diag lookup, then the owners seen lately read first). Median and p99 in ms.

Usage: .venv/bin/python scripts/bench_owner.py [--others 300] [--connections 200]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from durable_sidecar.proxy import peers  # noqa: E402


def before(peer: tuple, local: tuple) -> str | None:
    inode = peers.socket_inode(peer, local)
    pid = peers.owner(inode, owners=peers.Owners()) if inode else None  # nothing remembered
    return peers.start_of(pid) if pid else None


def timed(connections: int, lookup: Callable[[tuple, tuple], str | None]) -> list[float]:
    listener = socket.create_server(("127.0.0.1", 0))
    took = []
    for _ in range(connections):
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        started = time.perf_counter()
        start = lookup(server.getpeername(), server.getsockname())
        took.append((time.perf_counter() - started) * 1000)
        assert start is not None, "the connection's owner was not found"
        client.close()
        server.close()
    listener.close()
    return took


now = peers.start_of_connection


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--others", type=int, default=300)
    parser.add_argument("--connections", type=int, default=200)
    args = parser.parse_args()
    others = [subprocess.Popen(["sleep", "600"]) for _ in range(args.others)]
    try:
        print(f"{args.others} other processes, {args.connections} connections each way")
        print("| owner lookup | median ms | p99 ms |\n|---|---|---|")
        lookups = (("/proc/net/tcp, every process (before)", before), ("sock_diag, recent owners first", now))
        for name, lookup in lookups:
            took = sorted(timed(args.connections, lookup))
            print(f"| {name} | {statistics.median(took):.2f} | {took[int(len(took) * 0.99) - 1]:.2f} |")
    finally:
        for proc in others:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
