#!/usr/bin/env python3
"""Does one agent's body stall the others? p50/p99 of a small replay loop, quiet and while another
client records costly bodies, with that work off the event loop (the default, durable_offload_bytes
= 1 MiB of estimated cost) and inline (durable_offload_bytes=0), side by side in one run. Bodies:
`--kind json`, 15 MiB JSON bodies (`--mb`); `--kind multipart`, 280 KB multipart bodies of 5,000
parts each (small in bytes, slow to parse: what a byte threshold alone let through).

Usage: .venv/bin/python scripts/bench_bigbodies.py [--kind json|multipart] [--seconds 10] [--mb 15] [--dsn DSN]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage import run_for, stage  # noqa: E402

from durable_sidecar.tools import launcher

STEPS = 50


def big_json(mb: int, salt: str) -> bytes:
    """About `mb` MiB of small JSON objects: parsing and canonicalising it is real work."""
    item = {"id": 0, "salt": salt, "text": "lorem ipsum dolor sit amet"}
    per_item = len(json.dumps({**item, "id": 999_999})) + 2
    count = mb * 1024 * 1024 // per_item
    return json.dumps({"salt": salt, "items": [{**item, "id": n} for n in range(count)]}).encode()


def control(port: int, upstream: str, run: str, stop: threading.Event, latencies: list[float]) -> None:
    while not stop.is_set():
        proxy = launcher.proxy_url(f"127.0.0.1:{port}", run, f"c-{uuid.uuid4().hex[:10]}")
        with httpx.Client(proxy=proxy, trust_env=False, timeout=60) as client:
            for step in range(STEPS):
                started = time.perf_counter()
                client.get(f"{upstream}/v1/search", params={"q": f"control {step}"})
                latencies.append(time.perf_counter() - started)
                if stop.is_set():
                    return


def many_parts(parts: int, salt: str) -> bytes:
    """A multipart body of `parts` small fields (about 56 bytes each)."""
    return b"".join(f'--b\r\nContent-Disposition: form-data; name="f{n}"\r\n\r\n{salt[:4]}\r\n'.encode()
                    for n in range(parts)) + b"--b--\r\n"


def heavy(port: int, upstream: str, mb: int, stop: threading.Event, sent: list[int], kind: str = "json") -> None:
    if kind == "multipart":
        bodies, media = [many_parts(5000, uuid.uuid4().hex) for _ in range(3)], "multipart/form-data; boundary=b"
    else:
        bodies, media = [big_json(mb, uuid.uuid4().hex) for _ in range(3)], "application/json"
    with httpx.Client(proxy=launcher.proxy_url(f"127.0.0.1:{port}", f"heavy-{uuid.uuid4().hex[:8]}", "h1"),
                      trust_env=False, timeout=120) as client:
        while not stop.is_set():
            body = bodies[sent[0] % len(bodies)]
            if kind == "json":
                body = body[:-1] + f', "n": {sent[0]}}}'.encode()  # a new step each time
            else:
                body = body[:-6] + f'--b\r\nContent-Disposition: form-data; name="n"\r\n\r\n{sent[0]}\r\n--b--\r\n'.encode()
            r = client.post(f"{upstream}/v1/echo", content=body, headers={"Content-Type": media})
            if r.headers.get("durable-outcome") != "recorded":
                raise SystemExit(f"a big body was not recorded: {r.status_code} {r.text[:200]}")
            sent[0] += 1


def phase(
    port: int, upstream: str, run: str, seconds: float, mb: int, loaded: bool, kind: str = "json"
) -> tuple[list[float], int]:
    stop, latencies, sent = threading.Event(), [], [0]
    threads = [threading.Thread(target=control, args=(port, upstream, run, stop, latencies))]
    if loaded:
        threads.append(threading.Thread(target=heavy, args=(port, upstream, mb, stop, sent, kind)))
    run_for(threads, seconds, stop)
    return latencies, sent[0]


def ms(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--mb", type=int, default=15)
    parser.add_argument("--dsn")
    parser.add_argument("--kind", choices=["json", "multipart"], default="json")
    args = parser.parse_args()

    rows = []
    with stage(args.dsn, "bigbodies") as st:
        upstream = st.api
        for label, offload in (("off the loop (1 MiB)", "1048576"), ("inline", "0")):
            sidecar = launcher.start_sidecar(st.work / "conf", {"durable_dsn": st.dsn, "durable_offload_bytes": offload,
                                                               "termlog_verbosity": "warn"})
            try:
                run = f"control-{uuid.uuid4().hex[:8]}"
                with httpx.Client(proxy=launcher.proxy_url(f"127.0.0.1:{sidecar.port}", run, "rec"), trust_env=False) as c:
                    for step in range(STEPS):
                        c.get(f"{upstream}/v1/search", params={"q": f"control {step}"})
                quiet, _ = phase(sidecar.port, upstream, run, args.seconds, args.mb, loaded=False)
                loud, sent = phase(sidecar.port, upstream, run, args.seconds, args.mb, loaded=True, kind=args.kind)
                rows.append((label, quiet, loud, sent))
            finally:
                sidecar.stop()

    what = f"{args.mb} MiB JSON bodies" if args.kind == "json" else "280 KB multipart bodies of 5,000 parts"
    print(f"control replays while another client records {what} ({args.seconds:.0f} s per phase)")
    print(f"{'big-body work':22} {'quiet p50':>10} {'quiet p99':>10} {'loaded p50':>11} {'loaded p99':>11} "
          f"{'p99 loaded/quiet':>17} {'big bodies':>11}")
    for label, quiet, loud, sent in rows:
        print(f"{label:22} {ms(quiet, 50):9.1f}ms {ms(quiet, 99):9.1f}ms {ms(loud, 50):10.1f}ms {ms(loud, 99):10.1f}ms "
              f"{ms(loud, 99) / ms(quiet, 99):16.2f}x {sent:11}")


if __name__ == "__main__":
    main()
