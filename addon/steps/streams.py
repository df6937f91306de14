"""Live streams: the agent gets each chunk as the upstream sends it, while a capped tee records it.

mitmproxy buffers whole responses by default, which holds back every server-sent event until the
end. For responses that stream (event streams, chunked bodies of unknown length, bodies over the
cap) the sidecar sets `response.stream` to a StreamTee: a cheap synchronous callable that copies
each chunk into a bounded buffer and passes it on untouched.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

from mitmproxy import http

STREAM_TYPES = ("text/event-stream", "application/x-ndjson", "application/stream+json", "application/jsonl")

# Events after which an event stream is complete even if the client hangs up before the upstream
# closes it: the openai SDK stops reading at `data: [DONE]` and closes the connection.
END_MARKERS = (b"data: [DONE]", b"event: message_stop", b"event: response.completed", b"event: done")
_TAIL = 512
MAX_TIMINGS = 10_000  # chunk timings kept per stream, for paced replay


class StreamTee:
    """Records what streams through, up to `cap` bytes; past the cap it keeps nothing."""

    def __init__(self, cap: int, rpc_id: object = None) -> None:
        self.cap = cap
        self.rpc_id = rpc_id  # the JSON-RPC request's id (MCP): its response ends the answer
        self.buffer = bytearray()
        self.size = 0
        self.ended = False
        self.tail = b""  # the last bytes seen, kept even past the cap
        self.timings: list[tuple[float, int]] | None = []  # (ms since the headers, bytes) per chunk
        self._start = time.monotonic()

    @property
    def overflowed(self) -> bool:
        return self.size > self.cap

    def __call__(self, chunk: bytes) -> bytes:
        if not chunk:  # mitmproxy's end-of-stream call
            self.ended = True
            return b""
        self.size += len(chunk)
        if self.timings is not None:
            self.timings.append((round((time.monotonic() - self._start) * 1000, 1), len(chunk)))
            if len(self.timings) > MAX_TIMINGS:
                self.timings = None
        self.tail = (self.tail + chunk)[-_TAIL:]
        if self.overflowed:
            self.buffer = bytearray()  # bounded memory: drop what we had, stream on
        else:
            self.buffer += chunk
        return chunk

    def recorded(self) -> bytes:
        return bytes(self.buffer)

    def finished(self) -> bool:
        """The upstream ended the stream, or its last event says the answer is complete."""
        return (
            self.ended or ends_with_marker(self.tail) or (self.rpc_id is not None and answers(self.tail, self.rpc_id))
        )

    def complete(self) -> bool:
        """Finished and wholly recorded: the journal holds the entire answer."""
        return self.finished() and not self.overflowed


def _last_event(tail: bytes) -> bytes | None:
    """The stream's last complete event (its tail ends with a newline), None if there is none yet."""
    events = [e for e in tail.replace(b"\r\n", b"\n").split(b"\n\n") if e.strip()]
    return events[-1] if events and tail.rstrip(b"\r\n") != tail else None


def ends_with_marker(tail: bytes) -> bool:
    event = _last_event(tail)
    return event is not None and any(line.strip().startswith(END_MARKERS) for line in event.split(b"\n"))


def answers(tail: bytes, rpc_id: object) -> bool:
    """The stream's last complete event is the JSON-RPC response to request `rpc_id`: an MCP server
    may keep the stream open after it, and a client stops reading there."""
    event = _last_event(tail)
    if event is None:
        return False
    data = b"\n".join(line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:"))
    try:
        doc = json.loads(data)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("id") == rpc_id and ("result" in doc or "error" in doc)


RPC_MAX = 64 * 1024  # a JSON-RPC call (MCP) is small; a bigger body (an LLM prompt) is never parsed for it


def rpc_id(request: http.Request) -> object:
    """The id of a JSON-RPC request (an MCP call), None for anything else. Cheap for everything
    else: a streamed LLM call's body is only searched (in C) for `"jsonrpc"`, never parsed."""
    raw = request.raw_content
    if not raw or len(raw) > RPC_MAX or "json" not in request.headers.get("content-type", ""):
        return None
    try:
        body = request.get_content(strict=False) or b""
        doc = json.loads(body) if b'"jsonrpc"' in body else None
    except ValueError:
        return None
    return doc.get("id") if isinstance(doc, dict) and "jsonrpc" in doc and "method" in doc else None


def declared_length(headers: http.Headers) -> int | None:
    try:
        return int(headers["content-length"])
    except (KeyError, ValueError):
        return None


def streams(headers: http.Headers, cap: int, stream_types: Iterable[str] = STREAM_TYPES) -> bool:
    """Should this response reach the agent chunk by chunk rather than whole?"""
    media = headers.get("content-type", "").split(";")[0].strip().lower()
    if media in stream_types:
        return True
    length = declared_length(headers)
    return length is None or length > cap
