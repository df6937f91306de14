"""What the sidecar holds is bounded by durable_body_cap whatever the framing or the encoding: a
decompression bomb, a chunked upload that declares no length, an upload refused on its declared
length. Each is refused (413), nothing is forwarded or journaled, and the sidecar's peak resident
memory (VmHWM, read from /proc) grows by less than twice the cap."""

from __future__ import annotations

import base64
import select
import socket
import zlib

import pytest
import requests

from conftest import PaidApi, Sidecars, new_run, sql
from durable_sidecar.tools import launcher
from stage import status_kib

CAP = 8 * 1024 * 1024
MIB = 1024 * 1024


def peak_rss(pid: int) -> int:
    return status_kib(pid, "VmHWM") * 1024


def gzip_bomb(inflated: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(MIB)
    return b"".join(packer.compress(zeros) for _ in range(inflated // MIB)) + packer.flush()


def send_raw(port: int, run: str, head: str, body_parts, chunked: bool) -> bytes:
    """Write a request to the proxy as it comes (to keep sending after a refusal), return the answer."""
    auth = base64.b64encode(f"{run}:a1".encode()).decode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:  # a refusing sidecar stops reading
        conn.sendall(f"{head}\r\nProxy-Authorization: Basic {auth}\r\nConnection: close\r\n\r\n".encode())
        try:
            for part in body_parts:
                if select.select([conn], [], [], 0)[0]:
                    break  # the sidecar answered (refused) mid-upload: stop sending, as a client would
                conn.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n" if chunked else part)
            if chunked:
                conn.sendall(b"0\r\n\r\n")
        except OSError:  # the sidecar refused and closed while we were still sending
            pass
        answer = b""
        try:
            while chunk := conn.recv(65536):
                answer += chunk
                conn.settimeout(2)  # the answer is short: once it began, do not wait long for the close
        except OSError:
            pass
    return answer


@pytest.fixture
def capped(sidecars: Sidecars, http_api: PaidApi):
    """A sidecar with an 8 MiB cap, warmed up (one call recorded) so its memory is measured from
    its working size, not from its first flow's imports."""
    sidecar = sidecars.start(durable_body_cap=CAP)
    requests.post(f"{http_api.url}/v1/echo", data=b"warm", proxies={"http": sidecar.proxy_url(new_run(), "a1")},
                  timeout=30)
    http_api.reset()
    return sidecar


def bomb(coding: str, inflated: int) -> bytes:
    """`inflated` bytes of zeros, compressed with `coding` (a few hundred KB at most on the wire)."""
    if coding == "gzip":
        return gzip_bomb(inflated)
    if coding == "deflate":
        packer = zlib.compressobj(9)
        return b"".join(packer.compress(bytes(MIB)) for _ in range(inflated // MIB)) + packer.flush()
    if coding == "br":
        import brotli

        packer = brotli.Compressor(quality=5)
        return b"".join(packer.process(bytes(MIB)) for _ in range(inflated // MIB)) + packer.finish()
    from backports import zstd  # the zstd mitmproxy decodes with on Python < 3.14

    packer = zstd.ZstdCompressor(level=3)
    return b"".join(packer.compress(bytes(MIB)) for _ in range(inflated // MIB)) + packer.flush()


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_a_decompression_bomb_is_refused_without_inflating(coding: str, capped, http_api: PaidApi, pg_dsn: str) -> None:
    data = bomb(coding, 256 * MIB)
    before = peak_rss(capped.process.pid)
    run = new_run()
    r = requests.post(f"{http_api.url}/v1/echo", data=data, headers={"Content-Encoding": coding},
                      proxies={"http": capped.proxy_url(run, "a1")}, timeout=60)
    assert r.status_code == 413 and "durable_body_cap" in r.json()["reason"]
    window = 16 * MIB if coding == "br" else 0  # a brotli decoder keeps its window (up to 16 MiB) meanwhile
    assert peak_rss(capped.process.pid) - before < 2 * CAP + window
    assert http_api.books()["calls"] == 0
    assert sql(pg_dsn, "SELECT count(*) FROM durable_steps WHERE run_id = %s", run) == [(0,)]


def test_a_chunked_upload_past_the_cap_is_refused_as_it_arrives(capped, http_api: PaidApi, pg_dsn: str) -> None:
    before = peak_rss(capped.process.pid)
    run = new_run()
    head = (f"POST {http_api.url}/v1/echo HTTP/1.1\r\nHost: 127.0.0.1:{http_api.port}\r\n"
            "Transfer-Encoding: chunked\r\nContent-Type: application/octet-stream")
    answer = send_raw(capped.port, run, head, (bytes(MIB // 4) for _ in range(800)), chunked=True)
    assert answer.startswith(b"HTTP/1.1 413") and b"durable-outcome: refused" in answer.lower()
    assert peak_rss(capped.process.pid) - before < 2 * CAP
    assert http_api.books()["calls"] == 0
    assert sql(pg_dsn, "SELECT count(*) FROM durable_steps WHERE run_id = %s", run) == [(0,)]


def test_an_upload_refused_on_its_length_is_not_buffered(capped, http_api: PaidApi) -> None:
    before = peak_rss(capped.process.pid)
    head = (f"POST {http_api.url}/v1/echo HTTP/1.1\r\nHost: 127.0.0.1:{http_api.port}\r\n"
            f"Content-Length: {200 * MIB}\r\nContent-Type: application/octet-stream")
    answer = send_raw(capped.port, new_run(), head, (bytes(MIB) for _ in range(200)), chunked=False)
    assert answer.startswith(b"HTTP/1.1 413") and b"durable_body_cap" in answer
    assert peak_rss(capped.process.pid) - before < 2 * CAP
    assert http_api.books()["calls"] == 0


def test_a_chunked_upload_under_the_cap_is_journaled_and_replayed(capped, http_api: PaidApi) -> None:
    run = new_run()
    body = b"".join(bytes([n]) * 1000 for n in range(50))

    def chunks():
        for offset in range(0, len(body), 1000):
            yield body[offset:offset + 1000]

    first = requests.post(f"{http_api.url}/v1/echo", data=chunks(), proxies={"http": capped.proxy_url(run, "a1")},
                          timeout=30)
    second = requests.post(f"{http_api.url}/v1/echo", data=chunks(), proxies={"http": capped.proxy_url(run, "a2")},
                           timeout=30)
    assert first.content == body and second.content == body
    assert (first.headers["Durable-Outcome"], second.headers["Durable-Outcome"]) == ("recorded", "replayed")


def read_ahead_held(metrics_port: int) -> int:
    """The sidecar's own count of read-ahead bytes held (its durable_read_ahead_bytes gauge)."""
    text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    return int(float(next(line.split()[1] for line in text.splitlines() if line.startswith("durable_read_ahead_bytes "))))


def test_read_ahead_memory_is_one_budget_across_attempts(sidecars: Sidecars, http_api: PaidApi) -> None:
    """300 attempts each replay the first step of a run of 40 answers of 60 KB: every attempt reads
    ahead, but all of them together hold at most durable_read_ahead_bytes (here 4 MiB). Past
    durable_max_attempts (100) the least recently used attempt is forgotten, and its next call is
    refused, never answered from the start of the run.

    Two measures. What the budget holds (the sidecar's gauge) never passes it. Peak RSS, the real
    cost, grows by less than the budget plus 60 MiB: without the budget it grows by ~280 MiB (100
    kept attempts x 39 x 60 KB, measured); with it by 20-37 MiB, the rest being the attempts' state,
    each fetch's rows held twice (libpq and Python) for a moment, and the allocator's fragmentation,
    which vary with the server (the embedded PostgreSQL's path grows more than the machine's)."""
    budget = 4 * MIB
    port = launcher.free_port()
    sidecar = sidecars.start(
        durable_read_ahead_bytes=budget, durable_max_attempts=100, durable_metrics_listen=f"127.0.0.1:{port}"
    )
    run = new_run()
    session = requests.Session()
    session.proxies = {"http": sidecar.proxy_url(run, "rec")}
    for n in range(40):
        assert session.post(f"{http_api.url}/v1/echo", data=bytes([n]) * 60_000, timeout=30).ok
    before = peak_rss(sidecar.process.pid)
    held = []
    for attempt in range(300):
        r = requests.post(f"{http_api.url}/v1/echo", data=bytes([0]) * 60_000, timeout=30,
                          proxies={"http": sidecar.proxy_url(run, f"a{attempt}")})
        assert r.headers["Durable-Outcome"] == "replayed"
        if attempt % 20 == 19:
            held.append(read_ahead_held(port))
    assert max(held) <= budget and max(held) > budget // 2  # full, never over
    assert peak_rss(sidecar.process.pid) - before < budget + 60 * MIB
    forgotten = requests.post(f"{http_api.url}/v1/echo", data=bytes([1]) * 60_000, timeout=30,
                              proxies={"http": sidecar.proxy_url(run, "a0")})
    assert forgotten.status_code == 409 and "new attempt" in forgotten.json()["reason"]
    assert http_api.books()["calls"] == 40


def test_big_bodies_are_matched_off_the_event_loop_and_replay(sidecars: Sidecars, http_api: PaidApi) -> None:
    """Past durable_offload_bytes the body's fingerprint, redaction and diff are computed in the
    worker process (scripts/bench_bigbodies.py measures what that spares other agents): the same
    body, gzip-encoded or not, keeps the same fingerprint, and a changed field is still diffed."""
    import gzip
    import json

    sidecar = sidecars.start(durable_offload_bytes=64 * 1024, durable_redact_json="/secret")
    run = new_run()
    doc = {"secret": "s3cr3t", "items": [{"n": n, "text": "lorem ipsum"} for n in range(20_000)]}
    body = json.dumps(doc).encode()
    assert len(body) > 64 * 1024

    def post(attempt: str, data: bytes, **headers: str) -> requests.Response:
        return requests.post(f"{http_api.url}/v1/echo", data=data, timeout=60, proxies={"http": sidecar.proxy_url(run, attempt)},
                             headers={"Content-Type": "application/json", **headers})

    first = post("a1", body)
    again = post("a2", gzip.compress(body), **{"Content-Encoding": "gzip"})
    assert first.headers["Durable-Outcome"] == "recorded" and again.headers["Durable-Outcome"] == "replayed"
    assert again.content == first.content == body
    changed = post("a3", json.dumps({**doc, "items": doc["items"][:-1]}).encode())
    assert changed.headers["Durable-Outcome"] == "diverged"
    assert "body/items/19999" in sidecar.log() and "s3cr3t" not in sidecar.log()


def test_the_worker_process_does_not_outlive_a_killed_sidecar(sidecars: Sidecars, http_api: PaidApi) -> None:
    import json
    import os
    import subprocess

    from conftest import eventually

    sidecar = sidecars.start(durable_offload_bytes=1000)
    r = requests.post(f"{http_api.url}/v1/echo", data=json.dumps({"x": "y" * 5000}), timeout=60,
                      headers={"Content-Type": "application/json"}, proxies={"http": sidecar.proxy_url(new_run(), "a1")})
    assert r.headers["Durable-Outcome"] == "recorded"
    children = subprocess.run(["pgrep", "-P", str(sidecar.process.pid)], capture_output=True, text=True).stdout.split()
    assert children, "a big body should have started the worker process"
    sidecar.kill()
    assert eventually(lambda: [c for c in children if os.path.exists(f"/proc/{c}")], [], timeout=10) == []
