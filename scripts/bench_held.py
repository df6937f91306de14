#!/usr/bin/env python3
"""What held answers really cost in memory. `--answers` agents each download `--mb` MiB through the
sidecar; the journal's link (a TCP relay) is cut while the upstream works, so every answer's commit
fails and the sidecar holds it (steps/repairs.py). The link heals after `--hold-s` seconds; each
agent retries until answered from the journal. Prints the sidecar's RSS before, its peak while
holding, the bytes the sidecar counted as held, and whether every answer came back whole.

Usage: .venv/bin/python scripts/bench_held.py [--answers 6] [--mb 15] [--hold-s 4] [--dsn DSN]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from relay import Relay  # noqa: E402
from stage import stage, status_kib  # noqa: E402

from durable_sidecar.tools import launcher

DELAY_MS = 1500


def expected(mb: int) -> str:
    return hashlib.sha256((bytes(range(256)) * 256 * 16 * mb)[: mb * 1024 * 1024]).hexdigest()


def agent(port: int, url: str, run: str, out: dict[int, tuple[int, str, str]], n: int) -> None:
    """One agent: its call, then retries (as an SDK does with a 503) until answered."""
    with httpx.Client(proxy=launcher.proxy_url(f"127.0.0.1:{port}", run, "a1"), trust_env=False, timeout=120) as c:
        first = c.get(url)
        deadline, r = time.monotonic() + 60, first
        while r.status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.3)
            r = c.get(url)
        out[n] = (first.status_code, r.headers.get("durable-outcome", ""), hashlib.sha256(r.content).hexdigest())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=6)
    parser.add_argument("--mb", type=int, default=15)
    parser.add_argument("--hold-s", type=float, default=4)
    parser.add_argument("--dsn", default=None)
    parser.add_argument("--no-cut", action="store_true", help="the same downloads with the link whole: the baseline")
    args = parser.parse_args()
    with stage(args.dsn, "held") as st:
        relay, dsn = Relay.for_dsn(st.dsn)
        sidecar = launcher.start_sidecar(st.work / "conf", {"durable_dsn": dsn, "durable_db_timeout": "2000"})
        try:
            run = f"held-{uuid.uuid4().hex[:8]}"
            with httpx.Client(proxy=launcher.proxy_url(f"127.0.0.1:{sidecar.port}", run, "a1"), trust_env=False) as c:
                c.get(f"{st.api}/v1/search?q=warm")
            before = status_kib(sidecar.process.pid, "VmRSS")
            out: dict[int, tuple[int, str, str]] = {}
            threads = [
                threading.Thread(
                    target=agent,
                    args=(sidecar.port, f"{st.api}/v1/download?mb={args.mb}&delay_ms={DELAY_MS}&n={n}", run, out, n),
                )
                for n in range(args.answers)
            ]
            for t in threads:
                t.start()
            time.sleep(DELAY_MS / 2000)  # every pending commit is in; the upstream still works
            if not args.no_cut:
                relay.cut()
            time.sleep(args.hold_s)
            holding = status_kib(sidecar.process.pid, "VmHWM")
            settled = status_kib(sidecar.process.pid, "VmRSS")
            relay.heal()
            for t in threads:
                t.join()
            peak = status_kib(sidecar.process.pid, "VmHWM")
        finally:
            sidecar.stop()
            relay.close()
        whole = expected(args.mb)
        firsts = sorted(str(o[0]) for o in out.values())
        print(f"{args.answers} answers of {args.mb} MiB held for {args.hold_s} s under a cut link")
        print(f"  first answers:     {', '.join(firsts)}")
        print(f"  answered whole:    {sum(1 for o in out.values() if o[2] == whole)} of {args.answers}"
              f" (outcomes: {', '.join(sorted(o[1] for o in out.values()))})")
        print(f"  sidecar RSS:       {before / 1024:.0f} MiB before; while holding: peak {holding / 1024:.0f} MiB,"
              f" {settled / 1024:.0f} MiB at the end; peak overall (the retries' replays) {peak / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
