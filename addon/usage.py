"""LLM tokens in journaled answers (OpenAI- and Anthropic-style `usage`), to say what replay saved."""

from __future__ import annotations

import json
from typing import Any

from mitmproxy.net import encoding


def _usage_tokens(usage: Any) -> int:
    if not isinstance(usage, dict):
        return 0
    if isinstance(usage.get("total_tokens"), int):
        return usage["total_tokens"]
    fields = ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens")
    return sum(v for k in fields if isinstance(v := usage.get(k), int))


def _from_document(doc: Any) -> int:
    """Tokens of one JSON document: a completion, or one event of a stream."""
    if not isinstance(doc, dict):
        return 0
    if "usage" in doc:
        return _usage_tokens(doc["usage"])
    message = doc.get("message")  # Anthropic's message_start event
    return _usage_tokens(message.get("usage")) if isinstance(message, dict) else 0


def tokens(body: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    """Total tokens an answer reports; 0 when it reports none or cannot be read."""
    fields = {k.lower(): v for k, v in headers}
    coding = fields.get(b"content-encoding", b"").decode("latin-1")
    try:
        text = (encoding.decode(body, coding) if coding else body).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return 0
    if b"text/event-stream" in fields.get(b"content-type", b""):
        total = 0
        for line in text.splitlines():
            if line.startswith("data:"):
                try:
                    total += _from_document(json.loads(line[5:]))
                except ValueError:
                    continue
        return total
    try:
        return _from_document(json.loads(text))
    except ValueError:
        return 0
