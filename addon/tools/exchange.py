"""Runs in and out of the journal as mitmproxy flows: HAR 1.2 files and mitmproxy flow files.

Built on mitmproxy's own writer and readers (`FlowWriter`, `SaveHar.make_har`,
`read_flows_from_paths`, which reads both formats), so `mitmweb -r FILE` and HAR viewers show a
run as the sidecar journaled it. Record once in development, import, replay in CI.
"""

from __future__ import annotations

import json
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mitmproxy import connection, http, io
from mitmproxy.addons.savehar import SaveHar

from ..matching import fingerprint, redaction
from ..store import database
from ..store.crypto import Keyring, seal_url
from ..store.journal import Answer, Journal, NewStep, decode_headers, encode_headers


def _flow(
    row: dict[str, Any], client: connection.Client, servers: dict[tuple[str, int], connection.Server]
) -> http.HTTPFlow:
    """One journaled step as an HTTP flow; replayed steps are marked and the run and seq commented.
    The run's flows share one client and one server per address (building them is most of the cost)."""
    url = urlsplit(row["url"])
    port = url.port or (443 if url.scheme == "https" else 80)
    started = row["started_at"].timestamp()
    ended = (row["completed_at"] or row["started_at"]).timestamp()
    address = (url.hostname or "", port)
    if address not in servers:
        servers[address] = connection.Server(address=address)
    flow = http.HTTPFlow(client, servers[address])
    flow.request = http.Request(
        url.hostname or "",
        port,
        row["method"].encode(),
        url.scheme.encode(),
        b"",
        (url.path or "/").encode() + (b"?" + url.query.encode() if url.query else b""),
        b"HTTP/1.1",
        http.Headers(decode_headers(row["request_headers"])),
        bytes(row["request_body"] or b""),
        None,
        started,
        started,
    )
    if row["status"] is not None:
        flow.response = http.Response(
            (row["http_version"] or "HTTP/1.1").encode(),
            row["status"],
            (row["reason"] or "").encode("latin-1", "replace"),
            http.Headers(decode_headers(row["response_headers"])),
            bytes(row["response_body"] or b""),
            http.Headers(decode_headers(row["response_trailers"])) if row.get("response_trailers") else None,
            started,
            ended,
        )
    flow.comment = f"durable run {row['run_id']} step {row['seq']}: {row['state']}, replayed {row['replay_count']}x"
    if row["replay_count"]:
        flow.marked = ":recycle:"
    return flow


def flows(rows: list[dict[str, Any]]) -> list[http.HTTPFlow]:
    started = rows[0]["started_at"].timestamp() if rows else 0.0
    client = connection.Client(peername=("127.0.0.1", 0), sockname=("127.0.0.1", 0), timestamp_start=started)
    servers: dict[tuple[str, int], connection.Server] = {}
    return [_flow(row, client, servers) for row in rows]


def dump(run_flows: list[http.HTTPFlow], kind: str) -> bytes:
    """A run as HAR 1.2 (`har`) or a mitmproxy flow file (`flows`)."""
    if kind == "har":
        return json.dumps(SaveHar().make_har(run_flows)).encode()  # no indent: the C encoder, 3x faster
    out = BytesIO()
    writer = io.FlowWriter(out)
    for flow in run_flows:
        writer.add(flow)
    return out.getvalue()


def write_flows(path: Path, run_flows: list[http.HTTPFlow]) -> None:
    path.write_bytes(dump(run_flows, "flows"))


def write_har(path: Path, run_flows: list[http.HTTPFlow]) -> None:
    path.write_bytes(dump(run_flows, "har"))


def read(path: Path) -> list[http.HTTPFlow]:
    """HTTP flows with a response from a HAR or a mitmproxy flow file."""
    return [f for f in io.read_flows_from_paths([str(path)]) if isinstance(f, http.HTTPFlow) and f.response]


async def import_flows(dsn: str | None, run: str, flows_in: list[http.HTTPFlow]) -> int:
    """Journal each flow as a completed step of `run`, as if the sidecar had recorded it."""
    keyring = Keyring.from_option("")
    journal = Journal(dsn, keyring=keyring, deadlines=False)
    redactor = redaction.Redactor(redaction.load_key("", database.durable_home()))
    await journal.open()
    occurrences: dict[str, int] = {}
    steps = []
    try:
        if await journal.has_steps(run):
            raise ValueError(f"run {run!r} already exists: import into a new run")
        for flow in flows_in:
            req, resp = flow.request, flow.response
            assert resp is not None
            parts = fingerprint.request_parts(req)
            env = fingerprint.envelope(parts)
            key = f"v{fingerprint.VERSION}:{fingerprint.fingerprint(env)}"
            occurrence = occurrences.get(key, 0)
            occurrences[key] = occurrence + 1
            steps.append(
                (
                    NewStep(
                        run=run,
                        attempt="import",
                        key=key,
                        fp_version=fingerprint.VERSION,
                        occurrence=occurrence,
                        step_key=None,
                        method=req.method,
                        url=seal_url(keyring, redactor.url(req.pretty_url)),
                        envelope=redactor.envelope(env),
                        request_headers=encode_headers(redactor.headers(req.headers.fields)),
                        request_body=parts.body,
                        agent_idempotency_key=None,
                        mint_idempotency_key=False,
                        outcome="imported",
                    ),
                    Answer(
                        resp.status_code,
                        resp.reason,
                        resp.http_version,
                        encode_headers(resp.headers.fields),
                        resp.raw_content or b"",
                    ),
                )
            )
        return await journal.import_steps(run, steps)
    finally:
        await journal.close()
