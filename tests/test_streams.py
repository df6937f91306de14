"""Streams and bodies through a real sidecar: live SSE, truncation, compression, binary, HTTP/2,
plain WebSockets, bodies over the cap."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
from pathlib import Path

import httpx
import openai
import pytest
import requests
from mitmproxy.net import encoding

from conftest import PaidApi, Sidecars, eventually, new_run, sql


def sdk(sidecar, run: str, attempt: str, api: PaidApi, bundle: Path) -> openai.OpenAI:
    http_client = httpx.Client(proxy=sidecar.proxy_url(run, attempt), verify=ssl.create_default_context(cafile=str(bundle)), trust_env=False)
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key="sk-test", max_retries=0, http_client=http_client)


def via(sidecar, run: str, attempt: str) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.proxies = {"http": sidecar.proxy_url(run, attempt), "https": sidecar.proxy_url(run, attempt)}
    return session


MESSAGES = [{"role": "user", "content": "stream me a long answer please"}]


def test_openai_stream_arrives_live_and_replays_identically(
    sidecars: Sidecars, https_api: PaidApi, ca_bundle: Path, pg_dsn: str
) -> None:
    sidecar = sidecars.start()
    run = new_run()
    client = sdk(sidecar, run, "a1", https_api, ca_bundle)
    stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True, extra_body={"x_event_delay_ms": 150})
    first = next(iter(stream))
    assert https_api.books()["streams_finished"] == 0  # the first event came while the upstream still streamed
    text = (first.choices[0].delta.content or "") + "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert stream.response.headers["durable-outcome"] == "recorded"
    state = lambda: sql(pg_dsn, "SELECT state, streamed, truncated FROM durable_steps WHERE run_id = %s", run)  # noqa: E731
    assert eventually(state, [("completed", True, False)]) == [("completed", True, False)]

    raw_first, stored = sql(pg_dsn, "SELECT response_body, response_headers FROM durable_steps WHERE run_id = %s", run)[0]
    assert not [k for k, *_ in stored if k.lower().startswith("durable-")]  # the upstream's headers, not our labels
    with httpx.Client(proxy=sidecar.proxy_url(run, "a2"), verify=ssl.create_default_context(cafile=str(ca_bundle)), trust_env=False) as c:
        r = c.post(f"{https_api.url}/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": True,
                                                                 "x_event_delay_ms": 150})
    assert r.headers["durable-outcome"] == "replayed" and r.content == bytes(raw_first)
    replayed = sdk(sidecar, run, "a3", https_api, ca_bundle).chat.completions.create(
        model="m", messages=MESSAGES, stream=True, extra_body={"x_event_delay_ms": 150})
    assert "".join(c.choices[0].delta.content or "" for c in replayed if c.choices) == text
    assert https_api.books()["calls"] == 1


def test_stream_cut_by_the_upstream_is_in_doubt_and_reissued(
    sidecars: Sidecars, https_api: PaidApi, ca_bundle: Path, pg_dsn: str
) -> None:
    sidecar = sidecars.start()
    run = new_run()
    with pytest.raises(openai.APIConnectionError):
        list(sdk(sidecar, run, "a1", https_api, ca_bundle).chat.completions.create(
            model="m", messages=MESSAGES, stream=True, extra_body={"x_die_after_events": 2}))
    state = lambda: sql(pg_dsn, "SELECT state, truncated FROM durable_steps WHERE run_id = %s", run)  # noqa: E731
    assert eventually(state, [("pending", True)]) == [("pending", True)]
    # the next attempt re-sends it with the original key: the upstream answers from its key store
    stream = sdk(sidecar, run, "a2", https_api, ca_bundle).chat.completions.create(
        model="m", messages=MESSAGES, stream=True, extra_body={"x_die_after_events": 2})
    assert stream.response.headers["durable-outcome"] == "reissued"
    list(stream)
    assert https_api.books()["charges"] == 1


def test_sidecar_killed_mid_stream_leaves_the_step_in_doubt(
    sidecars: Sidecars, https_api: PaidApi, ca_bundle: Path, pg_dsn: str
) -> None:
    run = new_run()
    doomed = sidecars.start()
    stream = sdk(doomed, run, "a1", https_api, ca_bundle).chat.completions.create(
        model="m", messages=MESSAGES, stream=True, extra_body={"x_event_delay_ms": 300})
    next(iter(stream))
    doomed.kill()  # mid-stream
    assert sql(pg_dsn, "SELECT state FROM durable_steps WHERE run_id = %s", run) == [("pending",)]
    sidecar = sidecars.start()
    again = sdk(sidecar, run, "a2", https_api, ca_bundle).chat.completions.create(
        model="m", messages=MESSAGES, stream=True, extra_body={"x_event_delay_ms": 300})
    assert again.response.headers["durable-outcome"] == "reissued"
    assert "answer #1" in "".join(c.choices[0].delta.content or "" for c in again if c.choices)
    books = https_api.books()
    assert books["charges"] == 1 and books["deduplicated"] == 1


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_compressed_responses_replay_byte_identically(
    sidecars: Sidecars, http_api: PaidApi, coding: str
) -> None:
    sidecar = sidecars.start()
    run = new_run()
    url = f"{http_api.url}/v1/encoded?enc={coding}"
    accepting = {"Accept-Encoding": coding}
    first = via(sidecar, run, "a1").get(url, stream=True, headers=accepting)
    first_raw = first.raw.read(decode_content=False)
    second = via(sidecar, run, "a2").get(url, stream=True, headers=accepting)
    second_raw = second.raw.read(decode_content=False)
    assert second.headers["Durable-Outcome"] == "replayed" and second.headers["Content-Encoding"] == coding
    assert second_raw == first_raw and int(second.headers["Content-Length"]) == len(second_raw)
    assert encoding.decode(second_raw, coding) == b'{"call": 1, "enc": "%s"}' % coding.encode()
    assert http_api.books()["calls"] == 1


def test_a_client_that_does_not_accept_the_journaled_encoding_gets_it_decoded(
    sidecars: Sidecars, http_api: PaidApi
) -> None:
    """Recorded by `curl --compressed`, replayed to plain curl: readable JSON, not gzip bytes."""
    sidecar = sidecars.start()
    run, url = new_run(), f"{http_api.url}/v1/search?q=curl"

    def curl(attempt: str, *flags: str) -> subprocess.CompletedProcess:
        return subprocess.run(["curl", "-s", "-D", "-", *flags, "-x", sidecar.proxy_url(run, attempt), url],
                              capture_output=True, timeout=30)

    recorded = curl("a1", "--compressed")
    assert b"content-encoding: gzip" in recorded.stdout.lower()
    plain = curl("a2")
    head, _, body = plain.stdout.partition(b"\r\n\r\n")
    assert b"durable-outcome: replayed" in head.lower() and b"content-encoding" not in head.lower()
    assert json.loads(body)["query"] == "curl" and f"content-length: {len(body)}".encode() in head.lower()
    again = curl("a3", "--compressed")  # a client that accepts gzip still gets the journaled bytes
    assert b"content-encoding: gzip" in again.stdout.lower()
    assert http_api.books()["calls"] == 1


def test_request_bodies_match_whatever_their_compression(sidecars: Sidecars, http_api: PaidApi) -> None:
    sidecar = sidecars.start()
    run = new_run()
    doc = b'{"model": "m", "messages": [{"role": "user", "content": "compressed"}]}'
    url = f"{http_api.url}/v1/chat/completions"
    for attempt, coding in [("a1", "gzip"), ("a2", "zstd"), ("a3", "br"), ("a4", "identity")]:
        body = encoding.encode(doc, coding) if coding != "identity" else doc
        r = via(sidecar, run, attempt).post(url, data=body, headers={"Content-Type": "application/json", "Content-Encoding": coding})
        assert r.status_code == 200
        assert r.headers["Durable-Outcome"] == ("recorded" if attempt == "a1" else "replayed")
    assert http_api.books()["calls"] == 1


def test_request_body_lying_about_its_encoding_is_refused(sidecars: Sidecars, http_api: PaidApi, pg_dsn: str) -> None:
    sidecar = sidecars.start()
    run = new_run()
    r = via(sidecar, run, "a1").post(f"{http_api.url}/v1/echo", data=b"not gzip at all", headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400 and "Content-Encoding" in r.json()["reason"]
    assert http_api.books()["calls"] == 0
    assert sql(pg_dsn, "SELECT count(*) FROM durable_steps WHERE run_id = %s", run) == [(0,)]


def test_binary_bodies_round_trip(sidecars: Sidecars, http_api: PaidApi) -> None:
    sidecar = sidecars.start()
    run = new_run()
    blob = os.urandom(300_000) + bytes(range(256))
    first = via(sidecar, run, "a1").post(f"{http_api.url}/v1/echo", data=blob, headers={"Content-Type": "image/png"})
    second = via(sidecar, run, "a2").post(f"{http_api.url}/v1/echo", data=blob, headers={"Content-Type": "image/png"})
    assert first.content == blob and second.content == blob
    assert second.headers["Durable-Outcome"] == "replayed"
    assert http_api.books()["calls"] == 1


def test_http2_client_records_and_replays(
    sidecars: Sidecars, https_api: PaidApi, ca_bundle: Path, tmp_path: Path
) -> None:
    """curl speaks HTTP/2 to the sidecar (httpx over a proxy puts HTTP/1.1 first in its ALPN offer)."""
    sidecar = sidecars.start()
    run = new_run()
    seen = []
    for attempt in ("a1", "a2"):
        head_file, body_file = tmp_path / f"{attempt}.head", tmp_path / f"{attempt}.body"
        subprocess.run(
            ["curl", "-s", "--http2", "--compressed", "-D", str(head_file), "-o", str(body_file),
             "--cacert", str(ca_bundle), "-x", sidecar.proxy_url(run, attempt), f"{https_api.url}/v1/search?q=h2"],
            check=True, timeout=30,
        )
        block = head_file.read_bytes().decode().strip().split("\r\n\r\n")[-1]  # the last block: after CONNECT's answer
        status_line, *header_lines = block.split("\r\n")
        headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in header_lines)}
        seen.append((status_line.split()[0], headers["durable-outcome"], body_file.read_bytes()))
    assert [(v, o) for v, o, _ in seen] == [("HTTP/2", "recorded"), ("HTTP/2", "replayed")]
    assert seen[0][2] == seen[1][2] and b"result 0 for h2" in seen[1][2]
    assert https_api.books()["calls"] == 1


def test_body_over_the_cap_streams_through_intact_and_stays_in_doubt(
    sidecars: Sidecars, http_api: PaidApi, pg_dsn: str
) -> None:
    sidecar = sidecars.start(durable_body_cap=1024 * 1024)
    run = new_run()
    r = via(sidecar, run, "a1").get(f"{http_api.url}/v1/download", params={"mb": 5})
    assert len(r.content) == 5 * 1024 * 1024 and r.content[:256] == bytes(range(256))
    assert r.headers["Durable-Outcome"] == "passthrough"  # not journaled: not labelled recorded
    # a Content-Length body's last bytes leave before the commit (docs/steps.md): the row follows
    row = "SELECT state, truncated, octet_length(response_body) FROM durable_steps WHERE run_id = %s"
    assert eventually(lambda: sql(pg_dsn, row, run), [("pending", True, 0)]) == [("pending", True, 0)]
    assert "over durable_body_cap" in sidecar.log()


def test_request_over_the_cap_is_refused_unless_passthrough(sidecars: Sidecars, http_api: PaidApi, pg_dsn: str) -> None:
    blob = b"x" * (2 * 1024 * 1024)
    strict = sidecars.start(durable_body_cap=1024 * 1024)
    run = new_run()
    r = via(strict, run, "a1").post(f"{http_api.url}/v1/echo", data=blob)
    assert r.status_code == 413 and "durable_body_cap" in r.json()["reason"]
    assert http_api.books()["calls"] == 0
    lenient = sidecars.start(durable_body_cap=1024 * 1024, durable_oversize_request="passthrough")
    r = via(lenient, run, "a1").post(f"{http_api.url}/v1/echo", data=blob)
    assert r.status_code == 200 and r.content == blob and r.headers["Durable-Outcome"] == "passthrough"
    assert sql(pg_dsn, "SELECT count(*) FROM durable_steps WHERE run_id = %s", run) == [(0,)]


def test_ignored_hosts_pass_through(sidecars: Sidecars, http_api: PaidApi, pg_dsn: str) -> None:
    sidecar = sidecars.start(durable_ignore_hosts=r"^127\.0\.0\.1$")
    run = new_run()
    for _ in range(2):
        r = via(sidecar, run, "a1").get(f"{http_api.url}/v1/search", params={"q": "ignored"})
        assert r.headers["Durable-Outcome"] == "passthrough"
    assert http_api.books()["calls"] == 2
    assert sql(pg_dsn, "SELECT count(*) FROM durable_steps WHERE run_id = %s", run) == [(0,)]


def test_plain_websocket_is_journaled_and_replays_with_its_server_gone(sidecars: Sidecars, pg_dsn: str) -> None:
    """ws:// (no TLS): the handshake and each message are steps; a second attempt is answered
    from the journal after the server has stopped."""
    import websockets.asyncio.client
    import websockets.asyncio.server

    sidecar = sidecars.start()
    run = new_run()

    async def talk(port: int, attempt: str) -> list[str]:
        async with websockets.asyncio.client.connect(
            f"ws://127.0.0.1:{port}/chat", proxy=sidecar.proxy_url(run, attempt)
        ) as ws:
            got = []
            for word in ("one", "two"):
                await ws.send(word)
                got.append(await ws.recv())
            return got

    async def scenario() -> tuple[list[str], list[str]]:
        async def echo(ws) -> None:
            async for message in ws:
                await ws.send(f"echo: {message}")

        async with websockets.asyncio.server.serve(echo, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            first = await talk(port, "a1")
        return first, await talk(port, "a2")  # the server is gone

    assert asyncio.run(scenario()) == (["echo: one", "echo: two"], ["echo: one", "echo: two"])
    assert sql(pg_dsn, "SELECT method FROM durable_steps WHERE run_id = %s ORDER BY seq", run) == [
        ("GET",), ("WS",), ("WS",)]


def test_paced_replay_keeps_the_recorded_rhythm(sidecars: Sidecars, https_api: PaidApi, ca_bundle: Path, pg_dsn: str) -> None:
    """With durable_replay_pacing, a journaled stream is replayed event by event at the recorded pace.
    (The lower bound cannot flake: the pacer sleeps; what it checks is that it does.)"""
    import time

    sidecar = sidecars.start(durable_replay_pacing=True)
    run = new_run()
    extra = {"x_event_delay_ms": 120}
    recorded = "".join(c.choices[0].delta.content or "" for c in sdk(sidecar, run, "a1", https_api, ca_bundle)
                       .chat.completions.create(model="m", messages=MESSAGES, stream=True, extra_body=extra) if c.choices)
    timing = lambda: sql(pg_dsn, "SELECT chunk_timing IS NOT NULL FROM durable_steps WHERE run_id = %s", run)  # noqa: E731
    assert eventually(timing, [(True,)]) == [(True,)]
    (chunks,), = sql(pg_dsn, "SELECT chunk_timing FROM durable_steps WHERE run_id = %s", run)
    recorded_span_s = chunks[-1][0] / 1000
    assert len(chunks) > 5 and recorded_span_s > 0.6

    started = time.monotonic()
    stream = sdk(sidecar, run, "a2", https_api, ca_bundle).chat.completions.create(
        model="m", messages=MESSAGES, stream=True, extra_body=extra)
    arrivals = []
    text = ""
    for chunk in stream:
        arrivals.append(time.monotonic() - started)
        text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
    assert stream.response.headers["durable-outcome"] == "replayed" and text == recorded
    assert arrivals[-1] - arrivals[0] >= 0.5 * recorded_span_s  # spread out, not delivered at once
    assert https_api.books()["calls"] == 1


def test_a_response_cut_mid_body_stays_in_doubt(sidecars: Sidecars, http_api: PaidApi, pg_dsn: str) -> None:
    """Not streamed (a Content-Length under the cap): the upstream dies after 400 of 1000 bytes. The
    agent gets no complete answer, and the step is neither completed nor replayed as if it were."""
    sidecar = sidecars.start()
    run = new_run()
    try:
        first = via(sidecar, run, "a1").get(f"{http_api.url}/v1/cut")
        whole = first.status_code == 200 and len(first.content) == 1000
    except requests.RequestException:
        whole = False
    assert not whole
    state = eventually(lambda: sql(pg_dsn, "SELECT state FROM durable_steps WHERE run_id = %s", run), [("pending",)])
    assert state == [("pending",)]
    again = via(sidecar, run, "a2").get(f"{http_api.url}/v1/cut")
    assert again.headers.get("Durable-Outcome") != "replayed"
    assert http_api.books()["calls"] == 2


def test_the_retry_after_a_broken_exchange_is_the_same_step_with_the_same_key(
    sidecars: Sidecars, http_api: PaidApi, pg_dsn: str
) -> None:
    """The upstream dies mid-answer; the agent's SDK retries in the SAME attempt. The retry is that
    step again (re-sent with its original idempotency key), never a new step with a new key: on a
    payments API that would be a second charge."""
    sidecar = sidecars.start()
    run = new_run()
    session = via(sidecar, run, "a1")
    for _ in range(2):
        try:
            session.get(f"{http_api.url}/v1/cut")
        except requests.RequestException:
            pass
        eventually(lambda: sql(pg_dsn, "SELECT count(*) FROM durable_steps WHERE run_id = %s AND owner IS NULL", run),
                   [(1,)])
    assert sql(pg_dsn, "SELECT seq, state, last_outcome FROM durable_steps WHERE run_id = %s", run) == [
        (1, "pending", "reissued")  # the retry took the step over: re-sent as itself
    ]
