#!/usr/bin/env python3
"""What a span per step costs: bare mitmdump, the sidecar recording with OTLP export off, with it on
(to a local OTLP/HTTP receiver: scripts/otlp_receiver.py in this process), and with the collector
down (a closed port: every batch fails and is dropped), in interleaved rounds of fresh proxies
(scripts/bench.py's machinery), sequential and with 8 clients. Prints req/s, p50 and p99, and the
ratios against export off and against bare mitmdump.

Usage: .venv/bin/python scripts/bench_tracing.py [--requests 400] [--rounds 3] [--dsn DSN]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import Proxy, drive, sidecar_args, start_upstream, warm  # noqa: E402
from otlp_receiver import Receiver  # noqa: E402

from durable_sidecar.store import database
from durable_sidecar.tools import launcher

PATHS = ("bare", "export off", "export on", "collector down")


def environments(receiver: Receiver) -> dict[str, dict[str, str]]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return {
        "bare": base,
        "export off": base,
        "export on": {**base, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url},
        "collector down": {**base, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{launcher.free_port()}",
                           "OTEL_EXPORTER_OTLP_TIMEOUT": "1"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dsn")
    args = parser.parse_args()
    server = database.resolve(args.dsn).dsn
    dsn = database.create_database(server, "durable_bench_tracing")
    upstream, receiver = start_upstream(), Receiver()
    samples: dict[tuple[str, int], list[dict[str, float]]] = {(p, c): [] for p in PATHS for c in (1, 8)}
    try:
        with tempfile.TemporaryDirectory(prefix="durable-bench-tracing-") as tmp:
            work = Path(tmp)
            for _ in range(args.rounds):
                proxies: dict[str, Proxy] = {
                    name: warm([] if name == "bare" else sidecar_args(dsn), work, name, upstream, env)
                    for name, env in environments(receiver).items()
                }
                try:
                    for clients in (1, 8):
                        for name, proxy in proxies.items():
                            run = f"trace-{uuid.uuid4().hex[:8]}"
                            samples[(name, clients)].append(drive(proxy, upstream, run, "record", args.requests, clients))
                finally:
                    for proxy in proxies.values():
                        proxy.stop()
    finally:
        receiver.stop()
        database.drop_database(server, dsn)
    print(f"recording {args.requests} calls, median of {args.rounds} rounds; spans received: {len(receiver.spans())}")
    print(f"{'path':<16}{'clients':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'vs off':>9}{'vs bare':>9}")
    for clients in (1, 8):
        med = {p: {k: statistics.median(s[k] for s in samples[(p, clients)]) for k in ("rps", "p50", "p99")}
               for p in PATHS}
        for path in PATHS:
            m = med[path]
            print(f"{path:<16}{clients:>8}{m['rps']:>9.0f}{m['p50']:>9.2f}{m['p99']:>9.2f}"
                  f"{m['rps'] / med['export off']['rps']:>8.2f}x{m['rps'] / med['bare']['rps']:>8.2f}x")


if __name__ == "__main__":
    main()
