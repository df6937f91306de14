"""The places where the sidecar reaches into mitmproxy's HTTP layer, which no addon hook covers.

1. Request bodies of unknown length (chunked) are buffered by mitmproxy before the request hook
   sees them, with no per-flow limit. `state_consume_request_body`, the one method that appends to
   that buffer, is wrapped: past the cap the addon put on the flow (CAP_KEY) the request is refused
   (413) and the buffer dropped; a request already refused on its declared length (DRAIN_KEY) has
   the rest of its body dropped as it arrives instead of buffered.
2. Errors mitmproxy answers itself (a 502 when the upstream cannot be reached, a 413 from the cap
   above) are written by its HTTP/1 server with no response hook. `Http1Server.send` is wrapped so
   such an answer carries the Durable-* headers the addon put on the request (LABEL), like every
   other answer the agent gets (`Durable-Outcome: refused` alone before the addon knew more).

3. Orphans: when the agent hangs up after its request went upstream, mitmproxy closes the upstream
   connection too (it forwards the client's error to the server side, and cancels every server
   connection once the client's is gone), and the answer is lost while the upstream bills it. For a
   live durable step (ORPHAN_KEY) whose request was sent whole, `HttpStream.handle_protocol_error`
   no longer forwards the client's error, the client's connection handler waits for such orphans
   (up to durable_orphan_timeout) before mitmproxy tears the rest down, and writes to the gone
   client are dropped. The upstream exchange runs to its end and the response hook journals it.
   A streamed answer already complete when the client goes (COMPLETE_KEY: its end marker, or the
   JSON-RPC response to its request, arrived) is no orphan: it is journaled at once, and the
   upstream's stream (which an MCP server may keep open for pushes) is closed.

4. HTTP/2 for clients that offer it. Lazy connections (replay never opens one upstream) know no
   server protocol when the client's TLS handshake is answered, and mitmproxy's ALPN callback then
   takes the client's first choice: httpx and others list http/1.1 before h2, and got HTTP/1.1 where
   bare mitmdump (connecting upstream first) gives them h2. mitmproxy speaks h2 to a client whatever
   the upstream speaks, so the wrapped callback picks h2 whenever it is offered and neither side
   forced a protocol. (Addon hooks run before mitmproxy's TLS addon sets the callback's data, so no
   hook can do this.)

All are installed once, at addon load, and check that the mitmproxy in use has what they wrap; if
not, the sidecar logs what it cannot do and runs without it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator, Iterator
from typing import Any

from mitmproxy import flow as mflow
from mitmproxy import http

from ..steps import responses
from .patching import wrap_once

CAP_KEY = "durable_request_cap"  # flow.metadata: the cap on a request body of unknown length
DRAIN_KEY = "durable_request_drain"  # flow.metadata: already refused; what still arrives is dropped
LABEL = "_durable_label"  # on an http.Request: the Durable-* headers of its answer, as (name, value) pairs
UNLABELLED = responses.labels(None, None, "refused")  # an error for a request the addon never got to label
ORPHAN_KEY = "durable_orphanable"  # flow.metadata: a live step whose exchange may finish without its agent
ORPHANED = "_durable_orphaned"  # on an http.Request: its agent hung up; its answer goes to the journal only
COMPLETE_KEY = "durable_answer_complete"  # flow.metadata: a callable, True once a streamed answer is whole


class Orphans:
    """Flows whose agent hung up while the sidecar carries their upstream exchange to its end."""

    def __init__(self) -> None:
        self.timeout_s = 600.0  # durable_orphan_timeout, set by the addon
        self.on_expired: Callable[[mflow.Flow], None] = lambda flow: None  # the addon lets go of the step
        self.on_adopted: Callable[[mflow.Flow], None] = lambda flow: None  # the addon gives the step back
        self._waiting: dict[Any, dict[mflow.Flow, asyncio.Event]] = {}  # by client connection

    def adopt(self, flow: Any) -> None:
        setattr(flow.request, ORPHANED, True)
        self._waiting.setdefault(flow.client_conn, {})[flow] = asyncio.Event()
        self.on_adopted(flow)

    def done(self, flow: mflow.Flow) -> None:
        """The orphan's answer was journaled (or its exchange broke): it holds nothing up any more."""
        event = self._waiting.get(flow.client_conn, {}).get(flow)
        if event is not None:
            event.set()

    async def wait(self, client: Any) -> None:
        """Hold the client's connection handler until its orphans are done, or the timeout passed."""
        flows = self._waiting.get(client, {})
        if flows:
            pending = [asyncio.ensure_future(event.wait()) for event in flows.values()]
            _, late = await asyncio.wait(pending, timeout=self.timeout_s)
            for task in late:
                task.cancel()
            for flow, event in flows.items():
                if not event.is_set():
                    self.on_expired(flow)
        self._waiting.pop(client, None)


ORPHANS = Orphans()


def label(request: http.Request, pairs: list[tuple[str, str]]) -> None:
    setattr(request, LABEL, pairs)


def install() -> list[str]:
    """Install both wrappers; returns what could not be installed (empty when all is well)."""
    missing = []
    if not _finish_orphans():
        missing.append("an agent that hangs up mid-call takes its upstream call with it (no orphan finishing)")
    if not _cap_request_bodies():
        missing.append("request bodies of unknown length (chunked) are not counted against durable_body_cap")
    if not _label_error_answers():
        missing.append("errors mitmproxy answers itself carry no Durable-* headers")
    if not _prefer_h2():
        missing.append("clients that list http/1.1 before h2 get HTTP/1.1")
    return missing


def _prefer_h2() -> bool:
    try:
        from mitmproxy.addons import tlsconfig
    except ImportError:
        return False

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def alpn_select_callback(conn: Any, options: list[bytes]) -> Any:
            app = conn.get_app_data()
            if app["client_alpn"] is None and app["server_alpn"] is None and app["http2"] and b"h2" in options:
                return b"h2"
            return original(conn, options)

        return alpn_select_callback

    return wrap_once(tlsconfig, "alpn_select_callback", wrap)


def _cap_request_bodies() -> bool:
    try:
        from mitmproxy.proxy.layers.http import ErrorCode, HttpErrorHook, HttpStream, ResponseProtocolError, SendHttp
    except ImportError:
        return False

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def state_consume_request_body(self: Any, event: Any) -> Iterator[Any]:
            flow = self.flow
            if flow is None or (CAP_KEY not in flow.metadata and DRAIN_KEY not in flow.metadata):
                return original(self, event)  # a declared length within the cap: mitmproxy's own, no extra frame
            return capped(self, event)

        def capped(self: Any, event: Any) -> Generator[Any, Any, None]:
            yield from original(self, event)
            if self.flow is None:
                return
            if self.flow.metadata.get(DRAIN_KEY):  # refused already (413 on its declared length): hold nothing
                self.request_body_buf.clear()
                return
            cap = self.flow.metadata.get(CAP_KEY)
            if cap is None or len(self.request_body_buf) <= cap or self.client_state == self.state_errored:
                return
            message = f"request body of unknown length passed durable_body_cap ({cap} bytes); nothing was forwarded"
            self.request_body_buf.clear()  # hold nothing more
            self.flow.error = mflow.Error(message)
            yield HttpErrorHook(self.flow)
            yield SendHttp(
                ResponseProtocolError(self.stream_id, message, ErrorCode.REQUEST_TOO_LARGE), self.context.client
            )
            self.client_state = self.state_errored
            self.flow.live = False

        return state_consume_request_body

    return wrap_once(HttpStream, "state_consume_request_body", wrap)


def _label_error_answers() -> bool:
    try:
        from mitmproxy.connection import ConnectionState
        from mitmproxy.proxy import commands
        from mitmproxy.proxy.layers.http import ResponseProtocolError
        from mitmproxy.proxy.layers.http._http1 import Http1Server, make_error_response
    except ImportError:
        return False

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def send(self: Any, event: Any) -> Iterator[Any]:
            if getattr(self.request, ORPHANED, False):
                return iter(())  # the agent is gone: what its orphan's answer would have sent it goes nowhere
            status = event.code.http_status_code() if isinstance(event, ResponseProtocolError) else None
            if status is None or self.response or not self.conn.state & ConnectionState.CAN_WRITE:
                return original(self, event)  # every ordinary event: mitmproxy's own generator, no extra frame
            return labelled_error(self, event, status)

        def labelled_error(self: Any, event: Any, status: int) -> Generator[Any, Any, None]:
            pairs = getattr(self.request, LABEL, UNLABELLED)
            head, sep, body = make_error_response(status, event.message).partition(b"\r\n\r\n")
            extra = b"".join(f"\r\n{name}: {value}".encode("latin-1", "replace") for name, value in pairs)
            yield commands.SendData(self.conn, head + extra + sep + body)
            yield commands.CloseConnection(self.conn)

        return send

    return wrap_once(Http1Server, "send", wrap)


async def _outlast_closing(waiting: Any) -> None:
    """Await `waiting` (bounded by durable_orphan_timeout) through mitmproxy's own repeated cancels of
    the client's handler as it closes that side ("closed by command"); any other cancel wins."""
    task = asyncio.ensure_future(waiting)
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError as e:
            if e.args != ("closed by command",):
                task.cancel()
                raise


def _finish_orphans() -> bool:
    try:
        from mitmproxy.proxy.layers.http import HttpErrorHook, HttpStream, RequestProtocolError, ResponseProtocolError
        from mitmproxy.proxy.server import ConnectionHandler
    except ImportError:
        return False
    if not (hasattr(HttpStream, "handle_protocol_error") and hasattr(ConnectionHandler, "handle_connection")):
        return False  # both or neither: adopting an orphan needs its connection handler to wait for it

    def wrap_error(handle_error: Callable[..., Any]) -> Callable[..., Any]:
        def handle_protocol_error(self: Any, event: Any) -> Generator[Any, Any, None]:
            flow = self.flow
            if (
                isinstance(event, RequestProtocolError)
                and flow is not None
                and flow.metadata.get(ORPHAN_KEY)
                and self.client_state == self.state_done  # the whole request went upstream
                and self.server_state not in (self.state_done, self.state_errored)
                and not flow.metadata.get(COMPLETE_KEY, lambda: False)()  # whole already: journaled now
            ):
                self.client_state = self.state_errored
                ORPHANS.adopt(flow)
                return  # the upstream exchange goes on; the response hook journals its answer
            if (
                isinstance(event, ResponseProtocolError)
                and flow is not None
                and getattr(flow.request, ORPHANED, False)
                and self.server_state not in (self.state_done, self.state_errored)
            ):
                flow.error = mflow.Error(event.message)  # the orphan's upstream broke: mitmproxy would
                yield HttpErrorHook(flow)  # skip the error hook (its client errored), the step must hear it
            yield from handle_error(self, event)

        return handle_protocol_error

    def wrap_connection(handle_connection: Callable[..., Any]) -> Callable[..., Any]:
        async def handle_connection_then_orphans(self: Any, connection: Any) -> None:
            try:
                await handle_connection(self, connection)
            finally:  # also when mitmproxy closed the client's side (its handler is cancelled then)
                if connection is self.client:
                    await _outlast_closing(ORPHANS.wait(connection))

        return handle_connection_then_orphans

    return wrap_once(HttpStream, "handle_protocol_error", wrap_error) and wrap_once(
        ConnectionHandler, "handle_connection", wrap_connection
    )
