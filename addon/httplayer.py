"""The two places where the sidecar reaches into mitmproxy's HTTP layer, which no addon hook covers.

1. Request bodies of unknown length (chunked) are buffered by mitmproxy before the request hook
   sees them, with no per-flow limit. `state_consume_request_body`, the one method that appends to
   that buffer, is wrapped: past the cap the addon put on the flow (CAP_KEY) the request is refused
   (413) and the buffer dropped; a request already refused on its declared length (DRAIN_KEY) has
   the rest of its body dropped as it arrives instead of buffered.
2. Errors mitmproxy answers itself (a 502 when the upstream cannot be reached, a 413 from the cap
   above) are written by its HTTP/1 server with no response hook. `Http1Server.send` is wrapped so
   such an answer carries the Durable-* headers the addon put on the request (LABEL), like every
   other answer the agent gets.

Both are installed once, at addon load, and check that the mitmproxy in use has what they wrap;
if not, the sidecar logs what it cannot do and runs without it.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from mitmproxy import flow as mflow
from mitmproxy import http

CAP_KEY = "durable_request_cap"  # flow.metadata: the cap on a request body of unknown length
DRAIN_KEY = "durable_request_drain"  # flow.metadata: already refused; what still arrives is dropped
LABEL = "_durable_label"  # on an http.Request: the Durable-* headers of its answer, as (name, value) pairs


def label(request: http.Request, pairs: list[tuple[str, str]]) -> None:
    setattr(request, LABEL, pairs)


def install() -> list[str]:
    """Install both wrappers; returns what could not be installed (empty when all is well)."""
    missing = []
    if not _cap_request_bodies():
        missing.append("request bodies of unknown length (chunked) are not counted against durable_body_cap")
    if not _label_error_answers():
        missing.append("errors mitmproxy answers itself carry no Durable-* headers")
    return missing


def _cap_request_bodies() -> bool:
    try:
        from mitmproxy.proxy.layers.http import ErrorCode, HttpErrorHook, HttpStream, ResponseProtocolError, SendHttp
    except ImportError:
        return False
    original = getattr(HttpStream, "state_consume_request_body", None)
    if original is None or getattr(original, "durable_wrapped", False):
        return original is not None

    def state_consume_request_body(self: Any, event: Any) -> Generator[Any, Any, None]:
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
        yield SendHttp(ResponseProtocolError(self.stream_id, message, ErrorCode.REQUEST_TOO_LARGE), self.context.client)
        self.client_state = self.state_errored
        self.flow.live = False

    state_consume_request_body.durable_wrapped = True  # type: ignore[attr-defined]
    HttpStream.state_consume_request_body = state_consume_request_body
    return True


def _label_error_answers() -> bool:
    try:
        from mitmproxy.connection import ConnectionState
        from mitmproxy.proxy import commands
        from mitmproxy.proxy.layers.http import ResponseProtocolError
        from mitmproxy.proxy.layers.http._http1 import Http1Server, make_error_response
    except ImportError:
        return False
    original = getattr(Http1Server, "send", None)
    if original is None or getattr(original, "durable_wrapped", False):
        return original is not None

    def send(self: Any, event: Any) -> Generator[Any, Any, None]:
        pairs = getattr(self.request, LABEL, None)
        status = event.code.http_status_code() if isinstance(event, ResponseProtocolError) else None
        if pairs is None or status is None or self.response or not self.conn.state & ConnectionState.CAN_WRITE:
            yield from original(self, event)
            return
        head, sep, body = make_error_response(status, event.message).partition(b"\r\n\r\n")
        extra = b"".join(f"\r\n{name}: {value}".encode("latin-1", "replace") for name, value in pairs)
        yield commands.SendData(self.conn, head + extra + sep + body)
        yield commands.CloseConnection(self.conn)

    send.durable_wrapped = True  # type: ignore[attr-defined]
    Http1Server.send = send
    return True
