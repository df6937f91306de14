"""What in a request chooses its answer but is left out of the fingerprint: its choice digest.

The fingerprint leaves headers out, because credentials, user agents, trace ids and keys change
between attempts: a fresh OAuth token on restart must not make every call of a resumed run new. But
some of them choose the answer: whose data (`Authorization`, `Cookie`, `X-Tenant`), in what form
(`Accept`, `Accept-Language`), which bytes (`Range`), against which version (`If-None-Match`), from
which virtual host (a `Host` header other than the URL's), and a body's Content-Type parameters and
multipart part headers. Two requests that differ only there share a fingerprint, and occurrence
order alone would hand one the other's answer when they come back in another order.

So each step is journaled with a keyed hash (HMAC-SHA256 under the redaction key: no credential in
clear, none guessable from a dump) of those parts, and among journaled steps with the same
fingerprint, the attempt prefers the one whose choice matches (lifecycle.py). Only when none does
(the credentials rotated) does occurrence order decide, as before. The header list is
`durable_choice_headers` (`name`, or `host=name` for one host).
"""

from __future__ import annotations

import email.parser
import email.policy
import json
from collections.abc import Callable, Iterable

from mitmproxy import http

HEADERS = (
    "authorization",
    "cookie",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "openai-organization",
    "openai-project",
    "x-tenant",
    "x-tenant-id",
    "x-org-id",
    "accept",
    "accept-language",
    "range",
    "if-range",
    "if-none-match",
    "if-match",
    "if-modified-since",
    "if-unmodified-since",
)
MAX_MULTIPART = 1024 * 1024  # bytes of a multipart body whose part headers are read (the parser is slow)


def parts(request: http.Request, body: bytes, names: frozenset[str]) -> list[list[str]]:
    """The answer-choosing parts of `request` (its content-decoded body), as [name, value] pairs in a
    stable order."""
    chosen = [[k.lower(), v] for k, v in request.headers.items(multi=True) if k.lower() in names]
    host = request.headers.get("host")  # another virtual host than the URL's (pretty_host prefers this header)
    if host is not None and host.lower() not in (request.host.lower(), request.authority.lower(), _authority(request)):
        chosen.append(["host", host.lower()])
    content_type = request.headers.get("content-type", "")
    params = sorted(
        p.strip() for p in content_type.split(";")[1:] if p.strip() and not _named(p, "charset", "boundary")
    )
    if params:
        chosen.append(["content-type", ";".join(params)])
    if content_type.lower().startswith("multipart/") and len(body) <= MAX_MULTIPART:
        chosen += [["part", header] for header in _part_headers(content_type, body)]
    return sorted(chosen)


def digest(request: http.Request, body: bytes, names: frozenset[str], keyed: Callable[[bytes], str]) -> str | None:
    """The keyed hash of the answer-choosing parts; None when the request has none."""
    chosen = parts(request, body, names)
    return keyed(json.dumps(chosen).encode()) if chosen else None


def _authority(request: http.Request) -> str:
    return f"{request.host}:{request.port}".lower()


def _named(param: str, *names: str) -> bool:
    return param.split("=", 1)[0].strip().lower() in names


def _part_headers(content_type: str, body: bytes) -> Iterable[str]:
    """Every header of every part, with its position (the fingerprint reads only name, filename and type)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        return []
    return [f"{n}:{k.lower()}:{v}" for n, part in enumerate(message.iter_parts()) for k, v in part.items()]
