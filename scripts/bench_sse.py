#!/usr/bin/env python3
"""Time to first byte of a streamed (SSE) answer, side by side in one run: bare mitmdump (which
buffers a response whole by default), bare mitmdump streaming (`stream_large_bodies=1`), the same
on the sidecar's hook dispatch, the two-commit floor streaming (its first commit is on the path to
the first byte, as the sidecar's pending step is), the sidecar recording and the sidecar replaying.

The upstream sends its headers and first event at once, then the rest of the stream after a pause
(`--pause-ms`), so a proxy that holds the stream back shows it. Each call is a keep-alive POST on a
raw socket; the first byte is the first byte of the body (the first event), timed from the
request's send. Prints p50 and p99 per path, and each path's p50 minus bare streaming's.

Usage: .venv/bin/python scripts/bench_sse.py [--requests 200] [--rounds 3] [--pause-ms 20] [--warm 20] [--dsn DSN]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (its proxies)

from durable_sidecar.store import database

EVENT = b'data: {"choices": [{"delta": {"content": "tok"}}]}\n\n'
EVENTS = 10  # after the first, sent together after the pause


def start_upstream(pause_s: float) -> int:
    """An SSE upstream: headers and the first event at once, then the rest after `pause_s`."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                             + b"%x\r\n%s\r\n" % (len(EVENT), EVENT))
                await writer.drain()
                await asyncio.sleep(pause_s)
                rest = EVENT * (EVENTS - 1) + b"data: [DONE]\n\n"
                writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return bench.start_upstream(serve)


def ttfb_loop(proxy_port: int, upstream: int, run: str, attempt: str, requests: int) -> list[float]:
    """Sequential keep-alive POSTs on one socket; the ms from each send to its first body byte."""
    auth = base64.b64encode(f"{run}:{attempt}".encode()).decode()
    sock = socket.create_connection(("127.0.0.1", proxy_port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    for i in range(requests):
        body = bench.BODY % i
        request = (f"POST http://127.0.0.1:{upstream}/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{upstream}\r\n"
                   f"Content-Type: application/json\r\nAccept: text/event-stream\r\nProxy-Authorization: Basic {auth}\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        start = time.perf_counter()
        sock.sendall(request)
        received = b""
        while b"data:" not in received.partition(b"\r\n\r\n")[2]:
            chunk = sock.recv(65536)
            if not chunk:
                raise SystemExit(f"the proxy closed the connection: {received[:300]!r}")
            received += chunk
        times.append((time.perf_counter() - start) * 1000)
        chunked = b"transfer-encoding: chunked" in received.partition(b"\r\n\r\n")[0].lower()
        while not received.endswith(b"0\r\n\r\n" if chunked else b"[DONE]\n\n"):  # the rest of this answer
            chunk = sock.recv(65536)
            if not chunk:
                raise SystemExit("the proxy closed the connection mid-stream")
            received += chunk
        if not received.startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"through the proxy: {received[:300]!r}")
    sock.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of fresh proxies (medians)")
    parser.add_argument("--pause-ms", type=float, default=20.0, help="the upstream's pause after its first event")
    parser.add_argument("--warm", type=int, default=20, help="calls through each fresh proxy before measuring")
    parser.add_argument("--dsn")
    args = parser.parse_args()

    server = database.resolve(args.dsn).dsn
    dsn = database.create_database(server, "durable_bench_sse")
    upstream = start_upstream(args.pause_ms / 1000)
    streaming = ["--set", "stream_large_bodies=1"]
    paths = {"bare (buffers)": [], "bare, streaming": streaming,
             "bare, streaming, fast dispatch": streaming + bench.DISPATCH_ARGS,
             # what journaling before forwarding costs at least: one commit on the agent's path
             "floor, streaming, fast dispatch": streaming + bench.DISPATCH_ARGS + bench.floor_args(dsn),
             "sidecar": bench.sidecar_args(dsn)}
    samples: dict[str, list[list[float]]] = {k: [] for k in (*paths, "sidecar replay")}
    try:
        with tempfile.TemporaryDirectory(prefix="durable-sse-") as tmp:
            work = Path(tmp)
            for _ in range(args.rounds):
                for name, proxy_args in paths.items():
                    proxy = bench.start_proxy(proxy_args, work / "conf", work / f"{name.replace(' ', '-')}.log")
                    try:
                        ttfb_loop(proxy.port, upstream, f"warm-{uuid.uuid4().hex[:8]}", "warm", args.warm)
                        run = f"sse-{uuid.uuid4().hex[:8]}"
                        samples[name].append(ttfb_loop(proxy.port, upstream, run, "record", args.requests))
                        if name == "sidecar":  # a second attempt of the same run
                            samples["sidecar replay"].append(ttfb_loop(proxy.port, upstream, run, "replay", args.requests))
                    finally:
                        proxy.stop()
    finally:
        database.drop_database(server, dsn)

    def p(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))]

    results = {name: (statistics.median(p(r, 0.5) for r in rounds), statistics.median(p(r, 0.99) for r in rounds))
               for name, rounds in samples.items()}
    base = results["bare, streaming"][0]
    print(f"\ntime to first byte of an SSE answer ({args.requests} calls per round, median of {args.rounds} rounds;"
          f" the upstream pauses {args.pause_ms:g} ms after its first event)")
    print(f"{'path':<32} {'p50 ms':>8} {'p99 ms':>8} {'p50 - bare streaming':>21}")
    for name, (p50, p99) in results.items():
        label = "sidecar recording" if name == "sidecar" else name
        print(f"{label:<32} {p50:>8.2f} {p99:>8.2f} {p50 - base:>+21.2f}")


if __name__ == "__main__":
    main()
