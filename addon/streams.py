"""Live streams: the agent gets each chunk as the upstream sends it, while a capped tee records it.

mitmproxy buffers whole responses by default, which holds back every server-sent event until the
end. For responses that stream (event streams, chunked bodies of unknown length, bodies over the
cap) the sidecar sets `response.stream` to a StreamTee: a cheap synchronous callable that copies
each chunk into a bounded buffer and passes it on untouched.
"""

from __future__ import annotations

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

    def __init__(self, cap: int) -> None:
        self.cap = cap
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
        return self.ended or ends_with_marker(self.tail)

    def complete(self) -> bool:
        """Finished and wholly recorded: the journal holds the entire answer."""
        return self.finished() and not self.overflowed


def ends_with_marker(tail: bytes) -> bool:
    events = [e for e in tail.replace(b"\r\n", b"\n").split(b"\n\n") if e.strip()]
    return (
        bool(events)
        and tail.rstrip(b"\r\n") != tail
        and any(line.strip().startswith(END_MARKERS) for line in events[-1].split(b"\n"))
    )


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
