#!/usr/bin/env python3
"""Throw malformed and hostile HTTP at a live sidecar for a bounded time, while a control client
replays a known run, and report what got through.

Hostile traffic: random methods, header names and values (NUL, CR, 64 KiB), credentials (valid,
malformed, missing), Content-Encodings that lie, truncated bodies, broken chunk framing, a gzip bomb,
a chunked upload past the cap, WebSocket upgrades, requests cut anywhere. Meanwhile a control
client replays a recorded run over and over. (HTTP/1.1 only: the HTTP/2 paths are exercised by the
test suite, not fuzzed.)

Reported:
  requests sent          hostile requests written
  tracebacks             'Traceback' in the sidecar's log (a hook that raised)
  unjournaled forwards   calls the upstream received beyond the journaled steps (nothing may reach it
                         without a pending row first)
  control errors / p99   failures and p99 latency of the control client's replays, next to a quiet run
  peak RSS growth        the sidecar's VmHWM growth, against the cap it runs with

Usage: .venv/bin/python scripts/fuzz.py [--seconds 60] [--dsn DSN] [--seed N]
"""

from __future__ import annotations

import argparse
import base64
import random
import socket
import statistics
import sys
import threading
import time
import uuid
import zlib
from functools import cache
from pathlib import Path

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage import run_for, stage, status_kib  # noqa: E402

from durable_sidecar.tools import launcher

CAP = 4 * 1024 * 1024
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "BREW", "G\x00T", "", "POST POST"]
PATHS = ["/v1/echo", "/v1/search?q=x", "/v1/search?q=%00", "/v1/payments", "/%zz", "/" + "a" * 9000, "/v1/echo?\x00"]


def peak_rss(pid: int) -> int:
    return status_kib(pid, "VmHWM") * 1024


def credentials(rng: random.Random, run: str) -> bytes:
    choice = rng.randrange(6)
    if choice == 0:
        return b""
    if choice == 1:
        return b"Proxy-Authorization: Basic !!!notbase64\r\n"
    if choice == 2:
        user = rng.choice(["bad run id", "x" * 200, "ok:run", "\x00", run])
        return b"Proxy-Authorization: Basic " + base64.b64encode(f"{user}:{rng.choice(['a1', '', 'b b'])}".encode("utf-8", "surrogateescape")) + b"\r\n"
    return b"Proxy-Authorization: Basic " + base64.b64encode(f"{run}:fz{rng.randrange(1000)}".encode()) + b"\r\n"


def header_noise(rng: random.Random) -> bytes:
    out = b""
    for _ in range(rng.randrange(5)):
        name = rng.choice([b"X-Foo", b"Durable-Run-Id", b"Durable-Step-Key", b"X-\x00", b"Content-Type", b"Accept-Encoding"])
        value = rng.choice([b"a\x00b", b"v" * 65536, b"bad run", b"application/json", b"gzip", b"\xff\xfe", b"x\ry"])
        out += name + b": " + value + b"\r\n"
    return out


@cache
def gzip_bomb() -> bytes:
    """32 MiB of zeros in ~32 KB of gzip."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    return b"".join(packer.compress(bytes(1 << 20)) for _ in range(32)) + packer.flush()


def body_variant(rng: random.Random) -> tuple[bytes, bytes]:
    """(headers, body) of one hostile body."""
    choice = rng.randrange(8)
    if choice == 0:
        return b"Content-Length: 100\r\n", b"short"  # truncated
    if choice == 1:
        return b"Content-Encoding: gzip\r\nContent-Length: 9\r\n", b"not gzip!"  # lies
    if choice == 2:
        bomb = gzip_bomb()
        return b"Content-Encoding: gzip\r\nContent-Length: " + str(len(bomb)).encode() + b"\r\n", bomb
    if choice == 3:
        return b"Transfer-Encoding: chunked\r\n", b"zz\r\nbroken\r\n0\r\n\r\n"  # bad chunk size
    if choice == 4:
        chunk = bytes(1 << 20)
        return b"Transfer-Encoding: chunked\r\n", b"".join(b"100000\r\n" + chunk + b"\r\n" for _ in range(6)) + b"0\r\n\r\n"
    if choice == 5:
        return b"Content-Type: application/json\r\nContent-Length: 12\r\n", b'{"a": [1, 2'  # broken JSON, short
    if choice == 6:
        return b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n", b""
    body = bytes(rng.randrange(256) for _ in range(rng.randrange(2000)))
    return b"Content-Length: " + str(len(body)).encode() + b"\r\n", body


def hostile(port: int, upstream: str, rng: random.Random, run: str) -> None:
    method = rng.choice(METHODS)
    path = rng.choice(PATHS)
    head, body = body_variant(rng)
    if b"Upgrade: websocket" in head:
        upstream = "http://127.0.0.1:1"  # WebSockets pass through unjournaled by design: to nowhere, not billed
    request = (f"{method} {upstream}{path} HTTP/1.1\r\n".encode("utf-8", "surrogateescape") + b"Host: 127.0.0.1\r\n"
               + credentials(rng, run) + header_noise(rng) + head + b"Connection: close\r\n\r\n" + body)
    if rng.random() < 0.2:
        request = request[: rng.randrange(len(request))]  # cut anywhere
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(request)
            conn.settimeout(1)  # a cut request gets no answer: do not wait long for one
            while conn.recv(65536):
                pass
    except OSError:
        pass


def control(port: int, upstream: str, run: str, stop: threading.Event, latencies: list[float], errors: list[str]) -> None:
    """Replay the recorded run (5 steps) over and over, a new attempt each time."""
    while not stop.is_set():
        proxy = launcher.proxy_url(f"127.0.0.1:{port}", run, f"control-{uuid.uuid4().hex[:12]}")
        with httpx.Client(proxy=proxy, trust_env=False, timeout=10) as client:
            for step in range(5):
                started = time.perf_counter()
                try:
                    r = client.get(f"{upstream}/v1/search", params={"q": f"control {step}"})
                    if r.headers.get("durable-outcome") != "replayed":
                        errors.append(f"step {step}: {r.status_code} {r.headers.get('durable-outcome')}")
                except httpx.HTTPError as e:
                    errors.append(f"step {step}: {type(e).__name__}")
                latencies.append(time.perf_counter() - started)


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] * 1000 if len(values) >= 2 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--dsn", help="a PostgreSQL that may create databases (default: $DATABASE_URL, else embedded)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()

    with stage(args.dsn, "fuzz") as st:
        sidecar = launcher.start_sidecar(st.work / "conf", {"durable_dsn": st.dsn, "durable_body_cap": str(CAP)})
        try:
            report = fuzz(sidecar, st.api, st.dsn, args)
        finally:
            sidecar.kill()
    sys.exit(0 if report else 1)


def fuzz(sidecar: launcher.Sidecar, upstream: str, dsn: str, args: argparse.Namespace) -> bool:
    """Run the quiet and the fuzzed phase, print the figures; True when every target is met."""
    control_run = "fuzz-control"
    with httpx.Client(proxy=launcher.proxy_url(f"127.0.0.1:{sidecar.port}", control_run, "rec"), trust_env=False) as c:
        for step in range(5):
            c.get(f"{upstream}/v1/search", params={"q": f"control {step}"})

    def phase(seconds: float, fuzzing: bool) -> tuple[list[float], list[str], int]:
        stop, latencies, errors, sent = threading.Event(), [], [], [0]
        threads = [threading.Thread(target=control, args=(sidecar.port, upstream, control_run, stop, latencies, errors))]

        def fuzzer(seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                hostile(sidecar.port, upstream, rng, f"fuzz-{rng.randrange(50)}")
                sent[0] += 1

        if fuzzing:
            threads += [threading.Thread(target=fuzzer, args=(args.seed + i,)) for i in range(args.workers)]
        run_for(threads, seconds, stop)
        return latencies, errors, sent[0]

    quiet, _, _ = phase(min(10.0, args.seconds / 3), fuzzing=False)
    rss_before = peak_rss(sidecar.process.pid)
    loud, control_errors, sent = phase(args.seconds, fuzzing=True)
    rss_growth = peak_rss(sidecar.process.pid) - rss_before
    time.sleep(0.5)
    upstream_calls = httpx.get(f"{upstream}/_books", trust_env=False).json()["calls"]
    with psycopg.connect(dsn) as conn:
        journaled = conn.execute("SELECT count(*) FROM durable_steps").fetchone()[0]
    log = sidecar.log()
    tracebacks = log.count("Traceback")
    reissued = log.count("outcome=reissued")  # one journaled step, sent again by design
    alive = sidecar.process.poll() is None

    unjournaled = max(0, upstream_calls - journaled - reissued)
    print(f"hostile requests sent:   {sent} in {args.seconds:.0f} s ({args.workers} workers, seed {args.seed})")
    print(f"sidecar alive at the end: {alive}")
    print(f"tracebacks in its log:   {tracebacks}")
    print(f"unjournaled forwards:    {unjournaled} (upstream calls {upstream_calls}, journaled steps {journaled})")
    print(f"control errors:          {len(control_errors)} of {len(loud)} replays")
    print(f"control p99:             {p99(loud):.1f} ms fuzzed, {p99(quiet):.1f} ms quiet ({p99(loud) / p99(quiet):.2f}x)")
    print(f"peak RSS growth:         {rss_growth / 2**20:.1f} MiB (durable_body_cap {CAP / 2**20:.0f} MiB, "
          f"{args.workers} hostile clients at once)")
    for error in sorted(set(control_errors))[:5]:
        print(f"    {error}")
    return alive and not tracebacks and not unjournaled and not control_errors and rss_growth < 2 * CAP + 32 * 2**20


if __name__ == "__main__":
    main()
