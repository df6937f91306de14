"""Responses the sidecar makes itself: journaled answers rebuilt byte for byte, and refusals.

A journaled body is stored still content-encoded (gzip stays gzip) with its header pairs in order,
duplicates kept. Rebuilding goes through the raw constructor, never `Response.make`, which would
re-encode the body; framing headers are dropped and Content-Length set to the stored length.
"""

from __future__ import annotations

import json
import time
from typing import Any

from mitmproxy import http

RUN = "Durable-Run-Id"
STEP = "Durable-Step"
OUTCOME = "Durable-Outcome"
LABEL_NAMES = {name.lower().encode() for name in (RUN, STEP, OUTCOME)}

OUTCOMES = ("recorded", "replayed", "reissued", "passthrough", "diverged", "refused")

# hop-by-hop and framing headers: they describe the original connection, not the message
FRAMING = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"transfer-encoding",
    b"te",
    b"trailer",
    b"upgrade",
    b"content-length",
}


class Refused(Exception):
    """Answer the agent with this error instead of forwarding."""

    def __init__(self, status: int, reason: str, **details: Any) -> None:
        super().__init__(reason)
        self.status, self.reason, self.details = status, reason, details


def _has_no_body(method: str, status: int) -> bool:
    return method.upper() == "HEAD" or status < 200 or status in (204, 304)


def rebuild(
    method: str,
    http_version: bytes,
    status: int,
    reason: str | None,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    trailers: list[tuple[bytes, bytes]] | None = None,
) -> http.Response:
    """A response identical in status, headers, body bytes and trailers to the journaled one.

    Content-Length keeps its original name and place; other framing headers are dropped, and a
    chunked origin gets a Content-Length for the de-chunked body it now has.
    """
    bodyless = _has_no_body(method, status)
    length = str(len(body)).encode()
    fields: list[tuple[bytes, bytes]] = []
    has_length = False
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-length":
            fields.append((name, value if bodyless else length))
            has_length = True
        elif lower not in FRAMING:
            fields.append((name, value))
    if not has_length and not bodyless:
        fields.append((b"content-length", length))
    response = unchecked_response(
        http_version,
        status,
        (reason or "").encode("latin-1", "replace"),
        http.Headers(fields),
        body if status == 101 or not bodyless else b"",  # a 101's: its WebSocket's greeting, taken out
        time.time(),  # by conversations.py before the 101 is sent
    )
    if trailers is not None:
        response.data.trailers = http.Headers(trailers)
    return response


def accepts(accept_encoding: str, coding: str) -> bool:
    """Does an Accept-Encoding header accept `coding`? No header accepts nothing but identity (what
    a client that sends none, plain curl say, can read)."""
    for item in accept_encoding.split(","):
        name, _, params = item.partition(";")
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if name.strip().lower() in (coding, "*") and q > 0:
            return True
    return False


def fit_encoding(response: http.Response, accept_encoding: str) -> None:
    """A journaled answer in an encoding this client did not ask for (recorded by a client that
    accepted gzip, replayed to one that does not) is decoded, with its headers fixed up; any other
    answer stays byte-identical. An answer that does not decode is left as journaled."""
    coding = response.headers.get("content-encoding", "").strip().lower()
    if not coding or coding == "identity" or accepts(accept_encoding, coding):
        return
    try:
        response.decode(strict=True)
    except ValueError:
        return
    if "content-length" not in response.headers:
        response.headers["content-length"] = str(len(response.raw_content or b""))


def unchecked_response(
    http_version: bytes, status: int, reason: bytes, headers: http.Headers, body: bytes, timestamp: float
) -> http.Response:
    """`http.Response(...)` without mitmproxy's run-time type check of every field, which costs
    about 50 us, a tenth of a replay's whole cost in the sidecar; the types here are already right."""
    data = object.__new__(http.ResponseData)
    data.__dict__.update(
        http_version=http_version,
        status_code=status,
        reason=reason,
        headers=headers,
        content=body,
        trailers=None,
        timestamp_start=timestamp,
        timestamp_end=timestamp,
    )
    response = object.__new__(http.Response)
    response.data = data
    return response


def refusal(status: int, reason: str, **details: Any) -> http.Response:
    """A clear error for the agent: JSON saying what went wrong and where."""
    body = {"error": "durable-sidecar", "reason": reason, **{k: v for k, v in details.items() if v is not None}}
    headers = {"Content-Type": "application/json", OUTCOME: "refused"}
    if status == 407:
        headers["Proxy-Authenticate"] = 'Basic realm="durable-sidecar"'
    return http.Response.make(status, json.dumps(body, indent=None).encode() + b"\n", headers)


def unlabelled(fields: tuple[tuple[bytes, bytes], ...]) -> tuple[tuple[bytes, bytes], ...]:
    """Header pairs without the sidecar's own labels: what the upstream sent, as journaled (a streamed
    answer was labelled before its end, and the journal must not say `recorded` for its replays)."""
    return tuple(pair for pair in fields if pair[0].lower() not in LABEL_NAMES)


def label(response: http.Response, run: str | None, seq: int | None, outcome: str) -> None:
    """Stamp the durable headers on what the agent receives, replacing any the answer carried. One
    pass over the raw pairs (three `headers[name] = value` would scan and rebuild them three times,
    on every call)."""
    fields = response.headers.fields
    if any(name.lower() in LABEL_NAMES for name, _ in fields):
        fields = unlabelled(fields)
    response.headers.fields = fields + tuple(
        (name.encode(), value.encode("latin-1", "replace")) for name, value in labels(run, seq, outcome)
    )


def labels(run: str | None, seq: int | None, outcome: str) -> list[tuple[str, str]]:
    """The durable headers of an answer, as (name, value) pairs."""
    pairs = [(RUN, run)] if run is not None else []
    if seq is not None:
        pairs.append((STEP, str(seq)))
    return [*pairs, (OUTCOME, outcome)]
