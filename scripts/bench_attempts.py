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
import tempfile
import threading
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import paid_api  # noqa: E402

from addon import database, launcher  # noqa: E402


def rss(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attempts", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--dsn")
    args = parser.parse_args()

    admin = database.resolve(args.dsn).dsn
    dsn = database.create_database(admin, "durable_attempts")
    work = Path(tempfile.mkdtemp(prefix="durable-attempts-"))
    api, api_port = paid_api.spawn(work)
    upstream = f"http://127.0.0.1:{api_port}/v1/echo"
    sidecar = launcher.start_sidecar(work / "conf", {"durable_dsn": dsn, "termlog_verbosity": "warn"})
    host = f"127.0.0.1:{sidecar.port}"
    try:
        with httpx.Client(proxy=launcher.proxy_url(host, "long-run", "rec"), trust_env=False) as client:
            for n in range(40):
                client.post(upstream, content=bytes([n]) * 60_000)
        base = rss(sidecar.process.pid, "VmRSS")
        print(f"{'attempts':>9} {'RSS MiB':>8} {'growth MiB':>11} {'peak MiB':>9}")
        print(f"{0:9} {base:8.1f} {0.0:11.1f} {rss(sidecar.process.pid, 'VmHWM'):9.1f}")
        step = max(1, args.attempts // 10)
        done = 0
        while done < args.attempts:
            batch = range(done, min(done + step, args.attempts))
            lanes = [list(batch)[i::args.clients] for i in range(args.clients)]

            def replay(attempts: list[int]) -> None:
                for attempt in attempts:
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
        print(f"without the budget: +{args.attempts * 32 * 60_000 / 2**20:,.0f} MiB of read-ahead answers")
    finally:
        sidecar.kill()
        api.kill()
        database.drop_database(admin, dsn)


if __name__ == "__main__":
    main()
