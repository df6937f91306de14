"""Fingerprint v1: what makes two requests "the same call" (DESIGN.md section 2).

The fingerprint is sha256 over a canonical envelope. Headers are left out unless allow-listed, because
auth, user agents, trace ids and idempotency keys change between attempts of the same logical call.
JSON bodies are compared by value (sorted keys), multipart bodies by their parts (the random boundary
is ignored), anything else by its bytes. Volatile fields can be dropped per host.
"""

from __future__ import annotations

import dataclasses
import email.parser
import email.policy
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from . import bodies, jsonpointer

VERSION = 1


@dataclass(frozen=True)
class Rule:
    """A name (JSON pointer, query parameter or header) that applies to one host or, with host None, to all."""

    host: str | None
    name: str

    @classmethod
    def parse(cls, spec: str) -> Rule:
        """`name` or `host=name` (e.g. `api.openai.com=/metadata/ts`)."""
        host, sep, name = spec.partition("=")
        if not sep:
            return cls(None, spec.strip())
        return cls(host.strip().lower() or None, name.strip())

    def applies(self, host: str) -> bool:
        return self.host is None or self.host == host


@dataclass(frozen=True)
class MatchRules:
    ignore_json: tuple[Rule, ...] = ()
    ignore_query: tuple[Rule, ...] = ()
    match_headers: tuple[Rule, ...] = ()

    def names(self, rules: tuple[Rule, ...], host: str) -> list[str]:
        return [r.name for r in rules if r.applies(host)]


@dataclass(frozen=True)
class RequestParts:
    """The parts of a request the fingerprint reads; the body is already content-decoded."""

    method: str
    scheme: str
    host: str
    port: int
    path: str  # may carry a query string
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


def request_parts(request: Any) -> RequestParts:
    """RequestParts of a mitmproxy request; raises ValueError when the body lies about its encoding."""
    return dataclasses.replace(raw_parts(request), body=request.get_content(strict=True) or b"")


def raw_parts(request: Any) -> RequestParts:
    """RequestParts with the body as sent (not yet decoded): cheap, and picklable for `match`."""
    return RequestParts(
        method=request.method,
        scheme=request.scheme,
        host=request.host,
        port=request.port,
        path=request.path,
        headers=list(request.headers.items(multi=True)),
        body=request.raw_content or b"",
    )


def match(
    raw: RequestParts, step_key: str | None, cap: int, rules: MatchRules
) -> tuple[bytes | None, dict[str, Any], str]:
    """(decoded body, or None when it is the body as sent; canonical envelope; match key) of a
    request: its key is its explicit step key, or its fingerprint. Pure and module-level, so a big
    body's share runs in a worker process (and an unencoded body is not shipped back).

    Raises bodies.OverCap when the body decodes past `cap`, ValueError when it lies about its encoding."""
    body = bodies.decode(raw.body, _header(raw.headers, "content-encoding"), cap)
    parts = raw if body is raw.body else dataclasses.replace(raw, body=body)
    env = envelope(parts, rules)
    key = f"key:{step_key}" if step_key else f"v{VERSION}:{fingerprint(env)}"
    return (None if body is raw.body else body), env, key


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _header(headers: list[tuple[str, str]], name: str) -> str:
    return next((v for k, v in headers if k.lower() == name), "")


def _multipart_parts(content_type: str, body: bytes) -> list[dict[str, str]] | None:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        return None
    parts = []
    for part in message.iter_parts():
        payload = part.get_payload(decode=True)
        payload = payload if isinstance(payload, bytes) else b""
        parts.append(
            {
                "name": str(part.get_param("name", header="content-disposition") or ""),
                "filename": part.get_filename() or "",
                "type": part.get_content_type(),
                "sha256": _sha(payload),
            }
        )
    return parts


def body_digest(parts: RequestParts, ignore_pointers: list[str]) -> dict[str, Any]:
    if not parts.body:
        return {"kind": "empty"}
    content_type = _header(parts.headers, "content-type")
    media = content_type.split(";")[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        try:
            doc = json.loads(parts.body)
        except ValueError:
            pass  # not really JSON: compared by bytes below
        else:
            for pointer in ignore_pointers:
                if found := jsonpointer.locate(doc, pointer):
                    container, key = found
                    del container[key]
            return {"kind": "json", "sha256": _sha(canonical_json(doc))}
    if media.startswith("multipart/"):
        try:
            multipart = _multipart_parts(content_type, parts.body)
        except Exception:  # a broken multipart body is still a body: compare its bytes
            multipart = None
        if multipart is not None:
            return {"kind": "multipart", "parts": multipart}
    return {"kind": "raw", "sha256": _sha(parts.body)}


def envelope(parts: RequestParts, rules: MatchRules = MatchRules()) -> dict[str, Any]:
    """The canonical, JSON-serialisable description of a request that the fingerprint hashes."""
    host = parts.host.lower()
    split = urlsplit(parts.path)
    ignored_params = set(rules.names(rules.ignore_query, host))
    query = sorted([k, v] for k, v in parse_qsl(split.query, keep_blank_values=True) if k not in ignored_params)
    wanted = {n.lower() for n in rules.names(rules.match_headers, host)}
    headers = sorted([k.lower(), v] for k, v in parts.headers if k.lower() in wanted)
    result: dict[str, Any] = {
        "v": VERSION,
        "method": parts.method.upper(),
        "scheme": parts.scheme.lower(),
        "host": host,
        "port": parts.port,
        "path": split.path or "/",
        "query": query,
        "body": body_digest(parts, rules.names(rules.ignore_json, host)),
    }
    if headers:
        result["headers"] = headers
    return result


def fingerprint(env: dict[str, Any]) -> str:
    return _sha(canonical_json(env))
