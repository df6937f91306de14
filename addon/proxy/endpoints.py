"""What the sidecar answers itself, at http://durable.sidecar/: `/health` (serving means journaling),
`/ca.pem` (the CA it signs with) and `/flush` (the replay counts written now).

With durable_auth_secret set, a caller without some run's token gets only whether the sidecar is
ready (`/health`'s status and `{"ready": ...}`): the CA, the flush and the health details (the
journal's origin, the lease id, the calls in flight) answer 407 to it."""

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


async def answer(flow: http.HTTPFlow, lifecycle: Lifecycle, draining: bool, operator: bool) -> None:
    """`operator`: the caller may see more than liveness (admission.operator)."""
    path = flow.request.path
    if path not in ("/ca.pem", "/flush"):
        await health(flow, lifecycle, draining, operator)
    elif not operator:
        flow.response = responses.refusal(
            407, f"{path} needs a run's token (durable_auth_secret is set): proxy credentials RUN:ATTEMPT~TOKEN"
        )
        flow.response.headers["Proxy-Authenticate"] = 'Basic realm="durable-sidecar"'
    elif path == "/ca.pem":
        ca(flow)
    else:
        await flush(flow, lifecycle)


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


async def health(flow: http.HTTPFlow, lifecycle: Lifecycle, draining: bool, operator: bool) -> None:
    """Serving means journaling: the answer is 200 only once the journal is reachable and this
    sidecar holds its lease (the launcher starts no agent before that). Its details only to an operator."""
    journal = lifecycle.journal
    try:
        if draining:
            raise JournalError("the sidecar is stopping")
        lease_id = await journal.owner()
        await journal.ping()  # a frozen link keeps the lease's socket open: ask the journal itself
    except JournalError as e:
        details = {"failed": str(e)} if operator else {}  # the journal's address, perhaps: not for anyone
        flow.response = responses.refusal(503, "journal unavailable", **details)
        return
    target = journal.target
    body = (
        {"ready": True}
        if not operator
        else {
            "ready": True,
            "journal": target.origin if target else None,
            "lease": lease_id,
            "in_flight": len(lifecycle.in_flight),
        }
    )
    flow.response = http.Response.make(200, json.dumps(body).encode(), {"Content-Type": "application/json"})
