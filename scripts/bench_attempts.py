#!/usr/bin/env python3
"""Memory against the number of attempts: N attempts each replay the first step of a run of 40
answers of 60 KB, so every one of them reads ahead; the sidecar's resident memory is read after
each tenth of them. With the defaults (durable_read_ahead_bytes 64 MiB, durable_max_attempts
10,000) it must level off instead of growing by 32 x 60 KB per attempt.

Usage: .venv/bin/python scripts/bench_attempts.py [--attempts 10000] [--clients 8] [--dsn DSN]
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage import stage, status_kib  # noqa: E402

from durable_sidecar.tools import launcher


def rss(pid: int, field: str) -> float:
    return status_kib(pid, field) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attempts", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--dsn")
    args = parser.parse_args()

    with stage(args.dsn, "attempts") as st:
        sidecar = launcher.start_sidecar(st.work / "conf", {"durable_dsn": st.dsn, "termlog_verbosity": "warn"})
        try:
            measure(sidecar, f"{st.api}/v1/echo", args.attempts, args.clients)
        finally:
            sidecar.kill()


def measure(sidecar: launcher.Sidecar, upstream: str, attempts: int, clients: int) -> None:
    host = f"127.0.0.1:{sidecar.port}"
    with httpx.Client(proxy=launcher.proxy_url(host, "long-run", "rec"), trust_env=False) as client:
        for n in range(40):
            client.post(upstream, content=bytes([n]) * 60_000)
    base = rss(sidecar.process.pid, "VmRSS")
    print(f"{'attempts':>9} {'RSS MiB':>8} {'growth MiB':>11} {'peak MiB':>9}")
    print(f"{0:9} {base:8.1f} {0.0:11.1f} {rss(sidecar.process.pid, 'VmHWM'):9.1f}")
    step = max(1, attempts // 10)
    done = 0
    while done < attempts:
        batch = range(done, min(done + step, attempts))
        lanes = [list(batch)[i::clients] for i in range(clients)]

        def replay(lane: list[int]) -> None:
            for attempt in lane:
                with httpx.Client(proxy=launcher.proxy_url(host, "long-run", f"a{attempt}"), trust_env=False,
                                  timeout=30) as client:
                    r = client.post(upstream, content=bytes([0]) * 60_000)
                    assert r.headers["durable-outcome"] == "replayed", r.status_code

        threads = [threading.Thread(target=replay, args=(lane,)) for lane in lanes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done = batch.stop
        now = rss(sidecar.process.pid, "VmRSS")
        print(f"{done:9} {now:8.1f} {now - base:11.1f} {rss(sidecar.process.pid, 'VmHWM'):9.1f}", flush=True)
    print(f"without the budget: +{attempts * 32 * 60_000 / 2**20:,.0f} MiB of read-ahead answers")


if __name__ == "__main__":
    main()
