"""Paced replay (`durable_replay_pacing`): a journaled stream is replayed with its recorded timing.

mitmproxy sends a response set by an addon all at once, so a paced replay goes another way: the
flow is redirected to a small server inside the sidecar (127.0.0.1, an ephemeral port) that writes
the journaled bytes in their recorded chunks, sleeping between them as the upstream did. The
sidecar streams that "upstream" answer to the agent chunk by chunk. Nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

from mitmproxy import http

from ..store.journal import StoredResponse
from .responses import FRAMING

logger = logging.getLogger("durable")


class Pacer:
    def __init__(self) -> None:
        self.port: int | None = None
        self._staged: dict[str, StoredResponse] = {}
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def stage(self, flow: http.HTTPFlow, stored: StoredResponse) -> None:
        """Send this flow to the pacer, which answers it with `stored` at the recorded pace."""
        assert self.port is not None, "the pacer starts with the sidecar"
        token = secrets.token_hex(16)
        self._staged[token] = stored
        request = flow.request
        request.scheme, request.host, request.port = "http", "127.0.0.1", self.port
        request.path = f"/{token}"
        request.headers["host"] = f"127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            length = next(
                (int(line.split(b":", 1)[1]) for line in lines if line.lower().startswith(b"content-length:")), 0
            )
            if length:
                await reader.readexactly(length)  # the agent's request body: already matched, not needed
            token = lines[0].split(b" ")[1].lstrip(b"/").decode()
            stored = self._staged.pop(token, None)
            if stored is None:
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            await self._play(stored, writer)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, IndexError) as e:
            logger.warning("durable: paced replay broke off: %s", e)
        finally:
            writer.close()

    @staticmethod
    async def _play(stored: StoredResponse, writer: asyncio.StreamWriter) -> None:
        status = f"HTTP/1.1 {stored.status} {stored.reason or ''}\r\n".encode("latin-1", "replace")
        headers = b"".join(k + b": " + v + b"\r\n" for k, v in stored.headers if k.lower() not in FRAMING)
        writer.write(status + headers + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        start, offset = time.monotonic(), 0
        for at_ms, size in stored.chunk_timing or [[0, len(stored.body)]]:
            delay = start + at_ms / 1000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            piece = stored.body[offset : offset + int(size)]
            offset += int(size)
            if piece:
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
        if offset < len(stored.body):
            rest = stored.body[offset:]
            writer.write(b"%x\r\n%s\r\n" % (len(rest), rest))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
