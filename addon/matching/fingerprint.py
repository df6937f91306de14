"""Fingerprints: what makes two requests "the same call" (DESIGN.md section 2).

The fingerprint is sha256 over a canonical envelope. Headers are left out unless allow-listed, because
auth, user agents, trace ids and idempotency keys change between attempts of the same logical call.
Volatile fields can be dropped per host.

v2 (new runs) is exact: two requests an origin server can tell apart never share a fingerprint, and
two spellings are merged only where a standard makes them equal. The method and path as sent (only
the case of percent-encodings folded, RFC 3986 section 6.2.2.1); query pairs as sent, `&`-separated,
`flag` apart from `flag=`, ordered by key with repeated keys in their own order; the media type; a
JSON body from its tokens (numbers as written, strings by value, duplicate keys in order, keys of an
object sorted); multipart part by part, recursively, the random boundary ignored; other bodies by
their bytes. v1 (runs journaled before it) decoded and re-serialized too much: `a=1&a=2` matched
`a=2&a=1`, `1e400` matched `1e999`, `//a/x` matched `//b/x`. A run keeps the version it was journaled
with (`fp_version`), so its old steps keep matching.
"""

from __future__ import annotations

import dataclasses
import email.parser
import email.policy
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from . import bodies, jsonpointer

VERSION = 2  # what new runs are journaled with; VERSIONS: what this code can still match
VERSIONS = (1, 2)


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
    raw: RequestParts, step_key: str | None, cap: int, rules: MatchRules, version: int = VERSION
) -> tuple[bytes | None, dict[str, Any], str]:
    """(decoded body, or None when it is the body as sent; canonical envelope; match key) of a
    request: its key is its explicit step key, or its fingerprint. Pure and module-level, so a big
    body's share runs in a worker process (and an unencoded body is not shipped back).

    Raises bodies.OverCap when the body decodes past `cap`, ValueError when it lies about its encoding."""
    body = bodies.decode(raw.body, _header(raw.headers, "content-encoding"), cap)
    parts = raw if body is raw.body else dataclasses.replace(raw, body=body)
    env = envelope(parts, rules, version)
    key = f"key:{step_key}" if step_key else f"v{version}:{fingerprint(env)}"
    return (None if body is raw.body else body), env, key


PART_COST = 1024  # bytes a multipart part costs to parse, as an estimate (the email parser is slow)
OPENER_COST = 16  # bytes a JSON object or array costs to canonicalize
MAX_PARTS = 10_000  # past this a multipart body is digested as its bytes (it still matches itself)


def cost(raw: RequestParts) -> int:
    """What fingerprinting this request will cost, in bytes-equivalent: its size, plus its structure
    for the kinds of body parsed part by part. Counting is done in C, a fraction of the parse."""
    body = raw.body
    if not body:
        return 0
    media = _header(raw.headers, "content-type").lower()
    if media.startswith("multipart/"):
        return len(body) + PART_COST * body.count(b"\n--")
    if "json" in media:
        return len(body) + OPENER_COST * (body.count(b"{") + body.count(b"["))
    return len(body)


def canonical_json(value: Any) -> bytes:
    # surrogatepass: a path's undecodable bytes arrive as lone surrogates (surrogateescape) and still hash
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")


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


def envelope(parts: RequestParts, rules: MatchRules = MatchRules(), version: int = VERSION) -> dict[str, Any]:
    """The canonical, JSON-serialisable description of a request that the fingerprint hashes."""
    if version == 2:
        return _envelope_v2(parts, rules)
    if version != 1:
        raise ValueError(f"fingerprint version {version} is not known to this sidecar")
    host = parts.host.lower()
    split = urlsplit(parts.path)
    ignored_params = set(rules.names(rules.ignore_query, host))
    query = sorted([k, v] for k, v in parse_qsl(split.query, keep_blank_values=True) if k not in ignored_params)
    wanted = {n.lower() for n in rules.names(rules.match_headers, host)}
    headers = sorted([k.lower(), v] for k, v in parts.headers if k.lower() in wanted)
    result: dict[str, Any] = {
        "v": 1,
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


# -- v2 -----------------------------------------------------------------------------------------

_PERCENT = re.compile(r"%[0-9a-fA-F]{2}")


def _fold_percent(text: str) -> str:
    """`%2f` and `%2F` are one spelling (RFC 3986 section 6.2.2.1); nothing is decoded."""
    return _PERCENT.sub(lambda m: m.group(0).upper(), text) if "%" in text else text


def _query_v2(query: str, ignored: set[str]) -> list[list[str | None]]:
    """Pairs as sent (`&` only: `;` is data), `flag` (None) apart from `flag=` (""), sorted by key
    with a repeated key's values in the order sent (a stable sort)."""
    pairs: list[list[str | None]] = []
    for item in query.split("&") if query else []:
        key, sep, value = item.partition("=")
        if _unquote(key) in ignored:
            continue
        pairs.append([_fold_percent(key), _fold_percent(value) if sep else None])
    return sorted(pairs, key=lambda pair: pair[0] or "")


def _unquote(text: str) -> str:
    from urllib.parse import unquote_plus

    return unquote_plus(text)


class _Pairs(dict[str, Any]):
    """A JSON object as parsed (last duplicate wins, for pointers) that keeps every pair in order."""

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        self.pairs = pairs

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self.pairs = [pair for pair in self.pairs if pair[0] != key]


@dataclass(frozen=True)
class _Number:
    token: (
        str  # as written: 1e400 is not 1e999, 19.99 is not 19.990000000000000001 (Infinity, NaN: as Python writes them)
    )


def _json_tokens(value: Any) -> Any:
    """A parsed JSON document as a tagged tree that loses nothing the sender wrote but key order and
    string escapes (which JSON itself says carry no meaning)."""
    if isinstance(value, _Pairs):
        return ["o", sorted(([k, _json_tokens(v)] for k, v in value.pairs), key=lambda kv: kv[0])]
    if isinstance(value, list):
        return ["a", [_json_tokens(v) for v in value]]
    if isinstance(value, _Number):
        return ["n", value.token]
    return value  # a string, true, false, null


def _json_digest_v2(body: bytes, ignore_pointers: list[str]) -> str | None:
    try:
        doc = json.loads(body, object_pairs_hook=_Pairs, parse_float=_Number, parse_int=_Number, parse_constant=_Number)
    except (ValueError, RecursionError):
        return None  # not JSON, or too deep to parse: compared by its bytes
    for pointer in ignore_pointers:
        if found := jsonpointer.locate(doc, pointer):
            container, key = found
            del container[key]
    try:
        return _sha(canonical_json(_json_tokens(doc)))
    except RecursionError:
        return None


def _media(content_type: str) -> str:
    """The media type and its charset: what says how to read the bytes (a multipart boundary does not)."""
    media, _, params = content_type.partition(";")
    charset = next(
        (
            p.split("=", 1)[1].strip().strip('"').lower()
            for p in params.split(";")
            if p.strip().lower().startswith("charset=")
        ),
        "",
    )
    return media.strip().lower() + (f";charset={charset}" if charset else "")


def _multipart_v2(message: Any, depth: int = 0) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for part in message.iter_parts():
        entry: dict[str, Any] = {
            "name": str(part.get_param("name", header="content-disposition") or ""),
            "filename": part.get_filename() or "",
            "type": _media(str(part.get("content-type", ""))),
            "encoding": str(part.get("content-transfer-encoding", "")).lower(),
        }
        if part.is_multipart() and depth < 8:
            entry["parts"] = _multipart_v2(part, depth + 1)
        else:
            payload = part.get_payload(decode=True)  # None for a part nested too deep to parse further:
            entry["sha256"] = _sha(payload if isinstance(payload, bytes) else part.as_bytes())  # its bytes
        parts.append(entry)
    return parts


def _body_v2(parts: RequestParts, ignore_pointers: list[str]) -> dict[str, Any]:
    content_type = _header(parts.headers, "content-type")
    media = _media(content_type)
    if not parts.body:
        return {"kind": "empty", "media": media}
    base = media.split(";")[0]
    if base == "application/json" or base.endswith("+json"):
        digest = _json_digest_v2(parts.body, ignore_pointers)
        if digest is not None:
            return {"kind": "json", "media": media, "sha256": digest}
    if base.startswith("multipart/") and parts.body.count(b"\n--") <= MAX_PARTS:  # past it: its bytes
        try:
            message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + parts.body
            )
            if message.is_multipart():
                return {"kind": "multipart", "media": base, "parts": _multipart_v2(message)}
        except Exception:  # a broken multipart body is still a body: compare its bytes
            pass
    return {"kind": "raw", "media": media, "sha256": _sha(parts.body)}


def _envelope_v2(parts: RequestParts, rules: MatchRules) -> dict[str, Any]:
    host = parts.host.lower()
    path, _, query = parts.path.partition("?")
    path = path.partition("#")[0]
    ignored = set(rules.names(rules.ignore_query, host))
    wanted = {n.lower() for n in rules.names(rules.match_headers, host)}
    result: dict[str, Any] = {
        "v": 2,
        "method": parts.method,  # as sent: `post` is not `POST` to every server
        "scheme": parts.scheme.lower(),
        "host": host,
        "port": parts.port,
        "path": _fold_percent(path) or "/",
        "query": _query_v2(query.partition("#")[0], ignored),
        "body": _body_v2(parts, rules.names(rules.ignore_json, host)),
    }
    headers = [[k.lower(), v] for k, v in parts.headers if k.lower() in wanted]
    if headers:
        result["headers"] = sorted(headers, key=lambda kv: kv[0])  # a repeated header's values in order
    return result
