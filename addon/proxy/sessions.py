"""Upstream sessions across a resume.

A session token handed out by a replayed answer (MCP's `Mcp-Session-Id`, from `initialize`) names
a session the upstream may no longer have: it was redeployed, or the session expired, while the
agent was down. When the run goes live with such a token, the sidecar opens a new session upstream
with the agent's own handshake of this attempt (its `initialize`, then `notifications/initialized`)
and maps the old token to the new one on every later request and answer. Nothing of this is
journaled: the journal keeps the conversation as the agent saw it, with the old token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass, field

from mitmproxy import http

from .upstream_ws import tls_context

logger = logging.getLogger("durable")

HEADER = "mcp-session-id"
KEPT = 10_000  # replayed tokens remembered, least recently used dropped
SKIPPED = frozenset({HEADER, "host", "content-length", "transfer-encoding", "connection", "proxy-authorization"})


@dataclass
class Origin:
    """A token from a replayed answer: the agent's request that got it, and its live successor."""

    request: http.Request
    new: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Sessions:
    def __init__(self) -> None:
        self.origins: OrderedDict[tuple[str, str], Origin] = OrderedDict()

    def replayed(self, run: str, flow: http.HTTPFlow) -> None:
        """A replayed answer that hands out a token: remember the request that asked for it."""
        token = flow.response.headers.get(HEADER) if flow.response is not None else None
        if token and flow.request.headers.get(HEADER) != token:
            self.origins[(run, token)] = Origin(flow.request.copy())
            self.origins.move_to_end((run, token))
            while len(self.origins) > KEPT:
                self.origins.popitem(last=False)

    async def outgoing(self, run: str, request: http.Request) -> tuple[str, str] | None:
        """A request about to go upstream: a replayed token is swapped for its live session (opened
        on first use); (old, new), or None when the request carries no replayed token."""
        token = request.headers.get(HEADER)
        origin = self.origins.get((run, token)) if token else None
        if token is None or origin is None:
            return None
        async with origin.lock:
            if origin.new is None:
                try:
                    origin.new = await reopen(origin.request, request)
                except (OSError, ValueError) as e:
                    logger.warning("durable: run=%s MCP session not reopened upstream (%s): sent as it is", run, e)
                    return None
                logger.info("durable: run=%s MCP session of a replayed initialize reopened upstream", run)
        request.headers[HEADER] = origin.new
        return token, origin.new

    @staticmethod
    def incoming(response: http.Response, mapped: tuple[str, str]) -> None:
        """The live session's token in an answer goes back to the agent as the one it knows."""
        old, new = mapped
        if response.headers.get(HEADER) == new:
            response.headers[HEADER] = old


async def reopen(initialize: http.Request, current: http.Request) -> str:
    """Send the agent's `initialize` again, then `notifications/initialized`; the new token. The
    headers are the current request's (live credentials), the body the agent's initialize."""
    headers = {k: v for k, v in current.headers.items() if k.lower() not in SKIPPED}
    new = await asyncio.to_thread(_post, current.url, headers, initialize.content or b"")
    if not new:
        raise ValueError("the upstream's answer to initialize carries no Mcp-Session-Id")
    initialized = json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode()
    await asyncio.to_thread(_post, current.url, headers | {HEADER: new}, initialized)
    return new


def _post(url: str, headers: dict[str, str], body: bytes) -> str | None:
    """POST straight to the upstream (no proxy), as mitmproxy would verify it; its session header."""
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=tls_context())
    )
    with opener.open(urllib.request.Request(url, body, headers, method="POST"), timeout=30) as response:
        return response.headers.get(HEADER)  # the answer's body (an event stream, perhaps) is not needed
