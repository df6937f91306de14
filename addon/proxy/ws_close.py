"""Closing an agent's WebSocket from the sidecar, with a close code and a reason.

mitmproxy 12's WebSocket layer never looks at `flow.kill()`: a conversation the sidecar refused, or
whose upstream went away, stayed open until the agent's own timeout (or forever). The sidecar closes
it the way mitmproxy closes one on a peer's close frame instead: an event injected into the
connection's layer stack (queued behind the messages injected before it, so they arrive first)
sends a close frame to both sides that are still open, closes both connections and fires the
`websocket_end` hook once.

Codes the sidecar sends for itself are 4000 + the HTTP status the same refusal gets over HTTP
(4409: a step in doubt under `durable_in_doubt=fail`; 4503: the journal could not take it; 4502:
the upstream could not be reached); a server's own close is passed on with its code and reason.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import wsproto.events
from mitmproxy import ctx, http
from mitmproxy.proxy import commands
from mitmproxy.proxy.layers.websocket import WebsocketEndHook, WebsocketLayer, WebSocketMessageInjected
from mitmproxy.websocket import WebSocketMessage
from wsproto import ConnectionState
from wsproto.frame_protocol import Opcode

from .patching import wrap_once

logger = logging.getLogger("durable")

REASON_MAX = 123  # bytes of UTF-8 a close frame's reason may hold (RFC 6455, 5.5.1)
BASE = 4000  # + an HTTP status: the sidecar's own close codes


def code_for(status: int) -> int:
    """The close code for a refusal that HTTP answers with `status`."""
    return BASE + status if 100 <= status <= 599 else 1011


def fit(reason: str) -> str:
    """A reason that fits a close frame, cut at a character boundary."""
    data = reason.encode()
    return reason if len(data) <= REASON_MAX else data[: REASON_MAX - 3].decode("utf-8", "ignore") + "..."


@dataclass
class CloseInjected(WebSocketMessageInjected):
    """A close the sidecar sends; the layer routes it as it routes an injected message."""

    code: int = 1000
    reason: str = ""


def close(flow: http.HTTPFlow, code: int, reason: str) -> None:
    """Close the agent's WebSocket (and the upstream's, when mitmproxy holds one) with `code`."""
    proxyserver = ctx.master.addons.get("proxyserver")
    event = CloseInjected(flow, WebSocketMessage(Opcode.TEXT, False, b""), code, fit(reason))
    try:
        proxyserver.inject_event(event)
    except ValueError as e:  # the agent's connection is gone already
        logger.debug("durable: WebSocket close not sent: %s", e)


def install() -> bool:
    """Teach mitmproxy's WebSocket layer the close event `close` injects."""

    def wrap_relay(original: Any) -> Any:
        def relay_messages(self: Any, event: Any) -> Any:
            if not isinstance(event, CloseInjected):
                yield from original(self, event)
                return
            code = event.code
            ws = self.flow.websocket
            ws.timestamp_end, ws.closed_by_client = time.time(), False
            ws.close_code, ws.close_reason = code, event.reason
            frame = wsproto.events.CloseConnection(code, event.reason)
            for side in (self.server_ws, self.client_ws):
                if side.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
                    yield side.send2(frame)
                yield commands.CloseConnection(side.conn)
            yield WebsocketEndHook(self.flow)
            self.flow.live = False
            self._handle_event = self.done

        return relay_messages

    return wrap_once(WebsocketLayer, "relay_messages", wrap_relay)
