#!/usr/bin/env python3
"""Where a recording sidecar's CPU goes: py-spy samples the sidecar's process while a client records
sequential keep-alive POSTs through it (scripts/bench.py's client and upstream), then this prints the
share of samples by package (self time) and the sidecar's own functions (inclusive).

Usage: .venv/bin/pip install py-spy; .venv/bin/python scripts/profile_recording.py [--seconds 20] [--dsn DSN]
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (its upstream, proxy and client)

from durable_sidecar.store import database

PACKAGES = ("mitmproxy", "psycopg", "asyncio", "addon/", "selectors", "urllib", "h11", "dataclasses", "logging")


def summarize(raw: Path) -> None:
    by_package: collections.Counter[str] = collections.Counter()
    ours: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n, frames = int(count), stack.split(";")
        total += n
        leaf = re.search(r"\((.*?):\d+\)", frames[-1])
        path = leaf.group(1) if leaf else "?"
        by_package[next((p.rstrip("/") for p in PACKAGES if p in path), "other")] += n
        for name in {re.sub(r":\d+\)", ")", f) for f in frames if "addon/" in f}:
            ours[name] += n
    print(f"\n{total} samples; self time by package:")
    for name, n in by_package.most_common():
        print(f"{100 * n / total:6.1f}%  {name}")
    print("\nthe sidecar's functions, inclusive (a coroutine counts while it runs, not while it waits):")
    for name, n in ours.most_common(25):
        print(f"{100 * n / total:6.1f}%  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--dsn")
    args = parser.parse_args()
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")

    server = database.resolve(args.dsn).dsn
    dsn = database.create_database(server, "durable_profile")
    work = Path(tempfile.mkdtemp(prefix="durable-profile-"))
    upstream = bench.start_upstream()
    proxy = bench.start_proxy(bench.sidecar_args(dsn), work / "conf", work / "sidecar.log")
    try:
        bench.client_loop(proxy.port, upstream, "warm", "w", range(200))
        raw = work / "profile.raw"
        sampler = subprocess.Popen([spy, "record", "--pid", str(proxy.process.pid), "--format", "raw", "-o", str(raw),
                                    "--duration", str(args.seconds), "--rate", "500", "--nonblocking"])
        run, calls, end = f"profile-{uuid.uuid4().hex[:6]}", 0, time.monotonic() + args.seconds + 1
        while time.monotonic() < end:
            bench.client_loop(proxy.port, upstream, run, "a", range(calls, calls + 100))
            calls += 100
        sampler.wait()
        print(f"{calls} calls recorded in {args.seconds} s of sampling")
        summarize(raw)
    finally:
        proxy.stop()
        database.drop_database(server, dsn)


if __name__ == "__main__":
    main()
