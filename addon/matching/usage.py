"""LLM tokens in journaled answers (OpenAI- and Anthropic-style `usage`), to say what replay saved."""

from __future__ import annotations

import json
from typing import Any

from mitmproxy.net import encoding

_INPUT = ("prompt_tokens", "input_tokens")
_OUTPUT = ("completion_tokens", "output_tokens")


def _counts(doc: Any) -> dict[str, int]:
    """The usage counters one JSON document reports: a completion, or one event of a stream."""
    if not isinstance(doc, dict):
        return {}
    usage = doc.get("usage")
    for wrapper in ("message", "response"):  # Anthropic's message_start; the Responses API's response.completed
        if usage is None and isinstance(doc.get(wrapper), dict):
            usage = doc[wrapper].get("usage")
    if not isinstance(usage, dict):
        return {}
    return {k: v for k, v in usage.items() if k in ("total_tokens", *_INPUT, *_OUTPUT) and isinstance(v, int)}


def _total(counts: dict[str, int]) -> int:
    if "total_tokens" in counts:
        return counts["total_tokens"]
    return sum(counts.get(k, 0) for k in (*_INPUT, *_OUTPUT))


def documents(body: bytes, headers: list[tuple[bytes, bytes]]) -> list[Any]:
    """The JSON documents an answer holds: the body, a stream's events, or a WebSocket answer's
    server messages; none when it cannot be read."""
    fields = {k.lower(): v for k, v in headers}
    coding = fields.get(b"content-encoding", b"").decode("latin-1")
    try:
        raw = encoding.decode(body, coding) if coding else body
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except (ValueError, UnicodeDecodeError):
        return []
    content_type = fields.get(b"content-type", b"")
    if b"text/event-stream" in content_type:
        events = [line[5:] for line in text.splitlines() if line.startswith("data:")]
    elif b"x-durable-websocket" in content_type:  # a WebSocket answer: its server messages (conversations.py)
        try:
            events = [m["text"] for m in json.loads(text)["messages"] if "text" in m]
        except (ValueError, KeyError, TypeError):
            return []
    else:
        events = [text]
    docs = []
    for event in events:
        try:
            docs.append(json.loads(event))
        except ValueError:
            continue
    return docs


def tokens(body: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    """Total tokens an answer reports; 0 when it reports none or cannot be read.

    A stream's (or a WebSocket answer's) counters are running totals, not increments (Anthropic
    repeats `output_tokens` in `message_start` and again, cumulatively, in `message_delta`), so each
    counter's highest value counts.
    """
    highest: dict[str, int] = {}
    for doc in documents(body, headers):
        for name, value in _counts(doc).items():
            highest[name] = max(highest.get(name, 0), value)
    return _total(highest)
