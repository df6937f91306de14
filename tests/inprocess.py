"""A sidecar in process: the addon's hooks driven with mitmproxy's test flows, on a real journal.
The agent's calls and the upstream's answers are played by hand, so a test sees what each hook
leaves in the journal and hands the agent, in a second rather than a process's start-up."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from mitmproxy import flow as mflow
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from durable_sidecar.proxy.sidecar import META, DurableSidecar

STEPS = "SELECT seq, state, status, idempotency_key FROM durable_steps WHERE run_id = %s ORDER BY seq"


@contextlib.asynccontextmanager
async def sidecar(dsn: str, **options: Any) -> AsyncIterator[DurableSidecar]:
    """A sidecar on the journal at dsn, its journal open: the hooks run as mitmdump runs them."""
    addon = DurableSidecar()
    with taddons.context(addon) as tctx:
        # a test's waits end in seconds: a step wedged by a bug fails the test instead of hanging it
        options = {"durable_in_flight_wait": "5s", **options}
        tctx.configure(addon, durable_dsn=dsn, durable_attempt_per_start=False, **options)
        assert addon.lifecycle is not None
        await addon.lifecycle.journal.open()
        try:
            yield addon
        finally:
            await addon.lifecycle.journal.close()


def call(run: str, attempt: str, body: bytes = b'{"amount": 5}', method: str = "POST", **headers: str) -> http.HTTPFlow:
    """An agent's call to the paid API, as it reaches the request hook (before anything is sent)."""
    req = tutils.treq(
        method=method.encode(),
        host="api.test",
        port=443,
        scheme=b"https",
        path=b"/v1/charge",
        headers=http.Headers(content_type="application/json"),
        content=body,
    )
    for name, value in {"Durable-Run-Id": run, "Durable-Attempt": attempt, **headers}.items():
        req.headers[name.replace("_", "-")] = value
    flow = tflow.tflow(req=req)
    flow.client_conn.timestamp_end = None  # the agent is still connected
    flow.server_conn.timestamp_tcp_setup = flow.server_conn.timestamp_tls_setup = None  # nothing sent yet
    return flow


async def send(addon: DurableSidecar, flow: http.HTTPFlow) -> str:
    """The request hook; returns the step's outcome."""
    await addon.request(flow)
    return flow.metadata[META].outcome


async def answer(
    addon: DurableSidecar, flow: http.HTTPFlow, status: int = 200, body: bytes = b'{"charged": 5}'
) -> None:
    """The upstream answers a call the sidecar let go (the response hook)."""
    assert flow.response is None and flow.metadata[META].live, "only a forwarded call gets the upstream's answer"
    flow.server_conn.timestamp_tcp_setup = flow.server_conn.timestamp_tls_setup = 1.0
    flow.response = http.Response.make(status, body, {"x-upstream": "yes"})  # with its Content-Length
    addon.responseheaders(flow)
    assert not flow.response.stream  # a small answer of known length is buffered, then journaled whole
    await addon.response(flow)


async def break_off(addon: DurableSidecar, flow: http.HTTPFlow, connected: bool, tls_done: bool = True) -> None:
    """The exchange breaks (the error hook): before any connection to the upstream, or after."""
    if connected:
        flow.server_conn.timestamp_tcp_setup = 1.0
        flow.server_conn.tls = True
        flow.server_conn.timestamp_tls_setup = 1.0 if tls_done else None
    flow.error = mflow.Error("connection reset by peer")
    await addon.error(flow)


def new_run() -> str:
    return f"life-{uuid.uuid4().hex[:12]}"


def refusal(flow: http.HTTPFlow) -> tuple[int, dict[str, Any]]:
    assert flow.response is not None
    return flow.response.status_code, json.loads(flow.response.content)


async def stream(addon: DurableSidecar, flow: http.HTTPFlow, chunks: list[bytes], end: bool = True) -> bytes:
    """The upstream streams its answer (an event stream): the response headers, then each chunk as
    mitmproxy passes it through the sidecar's tee, then (with `end`) the end of the stream. Returns
    what reached the agent; the response hook is the caller's to fire (or the error hook)."""
    flow.server_conn.timestamp_tcp_setup = flow.server_conn.timestamp_tls_setup = 1.0
    flow.response = http.Response.make(200, b"", {"content-type": "text/event-stream"})
    del flow.response.headers["content-length"]
    addon.responseheaders(flow)
    tee = flow.response.stream
    assert callable(tee), "an event stream reaches the agent as it comes"
    seen = b"".join(tee(chunk) for chunk in chunks)
    if end:
        tee(b"")
    return seen
