"""The upstream end of a WebSocket conversation whose beginning was answered from the journal.

mitmproxy opens a WebSocket's upstream connection only with its handshake; a handshake replayed
from the journal opens none. When such a conversation reaches a message the journal does not know,
the sidecar opens the upstream itself (the `websockets` library: same URL, same headers, the TLS
settings mitmproxy verifies upstreams with) and relays between it and mitmproxy's client side.
While mitmproxy's own server side is unconnected, the client's pings are answered by the sidecar
(`install`), so a client that checks its connection with pings keeps it through replay.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import certifi
import websockets
from mitmproxy import ctx, http

from .patching import wrap_once

logger = logging.getLogger("durable")

# hop-by-hop and handshake headers: the websockets library writes its own
HANDSHAKE = frozenset(
    {
        "host",
        "connection",
        "upgrade",
        "content-length",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "proxy-authorization",
        "proxy-connection",
    }
)

OnMessage = Callable[[bytes, bool], Awaitable[None]]
OnClosed = Callable[[int | None, str], Awaitable[None]]


def tls_context() -> ssl.SSLContext:
    """Verify the upstream as mitmproxy does: its trusted CA file if given, else certifi's bundle;
    nothing with ssl_insecure."""
    options = ctx.options
    context = ssl.create_default_context(cafile=options.ssl_verify_upstream_trusted_ca or certifi.where())
    if options.ssl_insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class Upstream:
    """A WebSocket connection the sidecar opened to the conversation's server."""

    def __init__(self, ws: Any, on_message: OnMessage, on_closed: OnClosed) -> None:
        self.ws = ws
        self.reader = asyncio.create_task(self._read(on_message, on_closed))

    @classmethod
    async def open(cls, flow: http.HTTPFlow, on_message: OnMessage, on_closed: OnClosed) -> Upstream:
        req = flow.request
        scheme = "wss" if req.scheme == "https" else "ws"
        protocols = [p.strip() for p in req.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        headers = [(k, v) for k, v in req.headers.items(multi=True) if k.lower() not in HANDSHAKE]
        try:
            ws = await websockets.connect(
                f"{scheme}://{req.host}:{req.port}{req.path}",
                additional_headers=headers,
                subprotocols=protocols or None,
                ssl=tls_context() if scheme == "wss" else None,
                proxy=None,
                user_agent_header=None,
                max_size=None,
                open_timeout=30,
            )
        except (websockets.InvalidHandshake, websockets.InvalidURI, TimeoutError) as e:
            raise OSError(str(e)) from e
        logger.info("durable: %s: the conversation went live; upstream WebSocket opened", req.pretty_url)
        return cls(ws, on_message, on_closed)

    async def send(self, content: bytes, text: bool) -> None:
        try:
            await self.ws.send(content.decode("utf-8", "replace") if text else content)
        except websockets.ConnectionClosed as e:
            raise OSError(f"upstream WebSocket closed: {e}") from e

    async def _read(self, on_message: OnMessage, on_closed: OnClosed) -> None:
        try:
            async for message in self.ws:
                text = isinstance(message, str)
                await on_message(message.encode() if text else message, text)
        except websockets.ConnectionClosed:
            pass
        await on_closed(self.ws.close_code, self.ws.close_reason or "")

    async def close(self) -> None:
        self.reader.cancel()
        await self.ws.close()


def install() -> bool:
    """mitmproxy's WebSocket layer with no upstream connection (a handshake answered from the
    journal): nothing is relayed toward the missing server (mitmproxy would fail on its first frame,
    the client's close included), and the client's pings are answered with a pong by the proxy."""
    try:
        import wsproto.events
        from mitmproxy.proxy import commands
        from mitmproxy.proxy.layers.http import HttpStream, SendHttp
        from mitmproxy.proxy.layers.websocket import WebsocketConnection, WebsocketLayer
    except ImportError:
        return False

    def wrap_passthrough(original: Any) -> Any:
        def passthrough(self: Any, event: Any) -> Any:
            server = self.context.server
            for command in original(self, event):  # its child's blocking commands are answered to the child
                if isinstance(command, SendHttp) and command.connection == server and server.timestamp_start is None:
                    continue
                yield command

        return passthrough

    def wrap_start(original: Any) -> Any:
        def start(self: Any, event: Any) -> Any:
            yield from original(self, event)
            self.server_ws.peer = self.client_ws  # the side a pong goes to when the server cannot answer

        return start

    def wrap_send2(original: Any) -> Any:
        def send2(self: Any, event: Any) -> Any:
            peer = getattr(self, "peer", None)
            if peer is not None and self.conn.timestamp_start is None:
                if isinstance(event, wsproto.events.Ping):
                    return original(peer, event.response())
                return commands.Log(f"durable: no upstream connection: {type(event).__name__} not relayed", 10)
            return original(self, event)

        return send2

    # `_handle_event` is `start` until the layer has started (mitmproxy's layers switch it per state)
    return (
        wrap_once(HttpStream, "passthrough", wrap_passthrough)
        and wrap_once(WebsocketLayer, "_handle_event", wrap_start)
        and wrap_once(WebsocketConnection, "send2", wrap_send2)
    )
