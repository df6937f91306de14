"""What never reaches the journal in clear: credential headers are stored as a hash of their value."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

SECRET_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "x-api-key",
        "api-key",
        "x-goog-api-key",
        "openai-api-key",
        "anthropic-api-key",
    }
)


def redact_headers(fields: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Header pairs with every credential value replaced by `redacted:sha256:<16 hex>`.

    The short hash lets an operator tell two keys apart without the journal holding either.
    """
    return [
        (name, b"redacted:sha256:" + hashlib.sha256(value).hexdigest()[:16].encode())
        if name.decode("latin-1").lower() in SECRET_HEADERS
        else (name, value)
        for name, value in fields
    ]
