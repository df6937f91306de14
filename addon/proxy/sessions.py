"""Upstream sessions across a resume.

A session token handed out by a replayed answer (MCP's `Mcp-Session-Id`, from `initialize`) names
a session the upstream may still hold (a cart the agent built, a browser it opened) or may no
longer have: it was redeployed, or the session expired, while the agent was down. When the run goes
live with such a token, the sidecar first asks the upstream whether it still knows the session (an
MCP `ping` under that token: a 404 is the specification's "session gone"). Known: the token goes
as it is, and the session's state with it. Gone: the sidecar opens a new session with the agent's
own handshake of this attempt (its `initialize`, then `notifications/initialized`) and maps the old
token to the new one on every later request and answer. Nothing of this is journaled: the journal
keeps the conversation as the agent saw it, with the old token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
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
    new: str | None = None  # the token live requests carry: the old one while the upstream knows it
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
        """A request about to go upstream: a replayed token the upstream no longer knows is swapped
        for a live session (opened on first use); (old, new), or None when nothing is swapped."""
        token = request.headers.get(HEADER)
        origin = self.origins.get((run, token)) if token else None
        if token is None or origin is None:
            return None
        async with origin.lock:
            if origin.new is None:
                try:
                    if await known(request, token):
                        origin.new = token
                        logger.info("durable: run=%s MCP session of a replayed initialize still known upstream", run)
                    else:
                        origin.new = await reopen(origin.request, request)
                        logger.info("durable: run=%s MCP session of a replayed initialize reopened upstream", run)
                except (OSError, ValueError) as e:
                    logger.warning("durable: run=%s MCP session not reopened upstream (%s): sent as it is", run, e)
                    return None
        if origin.new == token:
            return None
        request.headers[HEADER] = origin.new
        return token, origin.new

    @staticmethod
    def incoming(response: http.Response, mapped: tuple[str, str]) -> None:
        """The live session's token in an answer goes back to the agent as the one it knows."""
        old, new = mapped
        if response.headers.get(HEADER) == new:
            response.headers[HEADER] = old


PING = json.dumps({"jsonrpc": "2.0", "id": "durable-session-check", "method": "ping"}).encode()


def live_headers(current: http.Request) -> dict[str, str]:
    """The current request's headers (its live credentials), none of the connection's or the session's."""
    return {k: v for k, v in current.headers.items() if k.lower() not in SKIPPED}


async def known(current: http.Request, token: str) -> bool:
    """Does the upstream still hold session `token`? An MCP `ping` under it (no side effects, answered
    by every MCP server); only a 404 says the session is gone (MCP's Streamable HTTP transport)."""
    status, _ = await asyncio.to_thread(_post, current.url, live_headers(current) | {HEADER: token}, PING)
    return status != 404


async def reopen(initialize: http.Request, current: http.Request) -> str:
    """Send the agent's `initialize` again, then `notifications/initialized`; the new token. The
    headers are the current request's (live credentials), the body the agent's initialize."""
    headers = live_headers(current)
    _, new = await asyncio.to_thread(_post, current.url, headers, initialize.content or b"")
    if not new:
        raise ValueError("the upstream's answer to initialize carries no Mcp-Session-Id")
    initialized = json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode()
    await asyncio.to_thread(_post, current.url, headers | {HEADER: new}, initialized)
    return new


def _post(url: str, headers: dict[str, str], body: bytes) -> tuple[int, str | None]:
    """POST straight to the upstream (no proxy), as mitmproxy would verify it: its status and
    session header (the answer's body, an event stream perhaps, is not needed)."""
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=tls_context())
    )
    try:
        with opener.open(urllib.request.Request(url, body, headers, method="POST"), timeout=30) as response:
            return response.status, response.headers.get(HEADER)
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get(HEADER)
