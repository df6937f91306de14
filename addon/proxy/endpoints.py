"""What the sidecar answers itself, at http://durable.sidecar/: `/health` (serving means journaling),
`/ca.pem` (the CA it signs with) and `/flush` (the replay counts written now)."""

from __future__ import annotations

import json

from mitmproxy import ctx, http

from ..steps import responses
from ..steps.lifecycle import Lifecycle
from ..store.journal import JournalError

HOST = "durable.sidecar"  # http://durable.sidecar/health through the proxy: is it serving?
# (matched on the Host header too: in transparent mode the request names no host of its own)


def addressed(request: http.Request) -> bool:
    """A request to http://durable.sidecar/, named by its URL or, in transparent mode where the
    request names no host of its own, by its Host header. Compared as text: mitmproxy's
    pretty_host parses (and IDNA-decodes) the header, a cost every call would pay."""
    if request.host == HOST:
        return True
    header = (request.host_header or "").lower()
    return header == HOST or header.startswith(HOST + ":")


async def answer(flow: http.HTTPFlow, lifecycle: Lifecycle, draining: bool) -> None:
    if flow.request.path == "/ca.pem":
        ca(flow)
    elif flow.request.path == "/flush":
        await flush(flow, lifecycle)
    else:
        await health(flow, lifecycle, draining)


def ca(flow: http.HTTPFlow) -> None:
    """The CA certificate this sidecar signs with (public): `durable run --proxy` hands the agent
    this one, whatever folder the sidecar was started with."""
    tlsconfig = ctx.master.addons.get("tlsconfig")
    flow.response = http.Response.make(
        200, tlsconfig.certstore.default_ca.to_pem(), {"Content-Type": "application/x-pem-file"}
    )


async def flush(flow: http.HTTPFlow, lifecycle: Lifecycle) -> None:
    """Write the replay counts gathered so far (every 0.5 s otherwise): `durable run --proxy`
    asks for it once the agent has exited, before it reads the attempt's summary."""
    await lifecycle.journal.flush_replays()
    flow.response = http.Response.make(204)


async def health(flow: http.HTTPFlow, lifecycle: Lifecycle, draining: bool) -> None:
    """Serving means journaling: the answer is 200 only once the journal is reachable and this
    sidecar holds its lease (the launcher starts no agent before that)."""
    journal = lifecycle.journal
    try:
        if draining:
            raise JournalError("the sidecar is stopping")
        lease_id = await journal.owner()
        await journal.ping()  # a frozen link keeps the lease's socket open: ask the journal itself
    except JournalError as e:
        flow.response = responses.refusal(503, "journal unavailable", failed=str(e))
        return
    target = journal.target
    body = {
        "ready": True,
        "journal": target.origin if target else None,
        "lease": lease_id,
        "in_flight": len(lifecycle.in_flight),
    }
    flow.response = http.Response.make(200, json.dumps(body).encode(), {"Content-Type": "application/json"})
