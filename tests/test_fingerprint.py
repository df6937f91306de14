"""Fingerprint v1 canonicalization (pure logic)."""

from __future__ import annotations

import gzip
import json

from mitmproxy.test import tutils

from durable_sidecar.matching import fingerprint as fp
from durable_sidecar.matching.fingerprint import MatchRules, RequestParts, Rule


def parts(body: bytes = b"", path: str = "/v1/x", headers=None, method: str = "POST", host: str = "api.example.com") -> RequestParts:
    return RequestParts(method, "https", host, 443, path, headers or [("Content-Type", "application/json")], body)


def key(p: RequestParts, rules: MatchRules = MatchRules()) -> str:
    return fp.fingerprint(fp.envelope(p, rules))


def test_json_key_order_and_whitespace_do_not_matter() -> None:
    a = parts(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
    b = parts(b'{"messages":[{"content":"hi","role":"user"}],"model":"m"}')
    assert key(a) == key(b)


def test_json_array_order_matters() -> None:
    assert key(parts(b'{"a": [1, 2]}')) != key(parts(b'{"a": [2, 1]}'))


def test_query_order_does_not_matter_but_values_do() -> None:
    assert key(parts(path="/s?b=2&a=1")) == key(parts(path="/s?a=1&b=2"))
    assert key(parts(path="/s?a=1&b=2")) != key(parts(path="/s?a=1&b=3"))


def test_host_is_case_insensitive_and_method_port_path_count() -> None:
    assert key(parts(host="API.Example.com")) == key(parts(host="api.example.com"))
    assert key(parts(method="GET")) != key(parts(method="POST"))
    assert key(parts(path="/v1/y")) != key(parts(path="/v1/x"))


def test_headers_are_ignored_unless_allow_listed() -> None:
    a = parts(b"{}", headers=[("Content-Type", "application/json"), ("Authorization", "Bearer 1"), ("X-Trace", "1")])
    b = parts(b"{}", headers=[("Content-Type", "application/json"), ("Authorization", "Bearer 2"), ("X-Trace", "2")])
    assert key(a) == key(b)
    rules = MatchRules(match_headers=(Rule.parse("x-trace"),))
    assert key(a, rules) != key(b, rules)


def multipart(boundary: str, content: bytes) -> RequestParts:
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\n"
        f"Content-Type: application/jsonl\r\n\r\n"
    ).encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return parts(body, headers=[("Content-Type", f"multipart/form-data; boundary={boundary}")])


def test_user_agent_and_other_client_noise_leave_the_fingerprint_alone() -> None:
    """An SDK upgrade changes User-Agent (and X-Stainless-* for the openai SDK): the agent's call is
    the same call, and must match its journaled step."""
    before = parts(b"{}", headers=[("Content-Type", "application/json"), ("User-Agent", "OpenAI/Python 1.40.0"),
                                   ("X-Stainless-Package-Version", "1.40.0")])
    after = parts(b"{}", headers=[("Content-Type", "application/json"), ("User-Agent", "OpenAI/Python 1.99.0"),
                                  ("X-Stainless-Package-Version", "1.99.0")])
    assert key(before) == key(after)
    assert key(before, MatchRules(match_headers=(Rule.parse("user-agent"),))) != key(after, MatchRules(
        match_headers=(Rule.parse("user-agent"),)))  # unless asked for


def test_multipart_ignores_the_random_boundary() -> None:
    assert key(multipart("aaaa1111", b'{"x":1}')) == key(multipart("bbbb2222", b'{"x":1}'))
    assert key(multipart("aaaa1111", b'{"x":1}')) != key(multipart("aaaa1111", b'{"x":2}'))
    env = fp.envelope(multipart("aaaa1111", b"data"))
    assert env["body"]["kind"] == "multipart"
    assert [(p["name"], p["filename"]) for p in env["body"]["parts"]] == [("purpose", ""), ("file", "a.jsonl")]


def test_gzip_request_body_is_fingerprinted_decoded() -> None:
    doc = {"model": "m", "input": "hello"}
    plain = tutils.treq(method=b"POST", content=json.dumps(doc).encode())
    plain.headers["content-type"] = "application/json"
    zipped = tutils.treq(method=b"POST", content=b"")
    zipped.headers["content-type"] = "application/json"
    zipped.headers["content-encoding"] = "gzip"
    zipped.raw_content = gzip.compress(json.dumps(doc, indent=2).encode())
    assert fp.fingerprint(fp.envelope(fp.request_parts(plain))) == fp.fingerprint(fp.envelope(fp.request_parts(zipped)))


def test_body_that_lies_about_its_encoding_raises_value_error() -> None:
    liar = tutils.treq(method=b"POST", content=b"")
    liar.headers["content-encoding"] = "gzip"
    liar.raw_content = b"this is not gzip"
    try:
        fp.request_parts(liar)
    except ValueError:
        return
    raise AssertionError("expected ValueError")


def test_ignored_json_pointer_and_query_param_per_host() -> None:
    rules = MatchRules(ignore_json=(Rule.parse("api.example.com=/metadata/ts"),), ignore_query=(Rule.parse("nonce"),))
    a = parts(b'{"q": 1, "metadata": {"ts": 1, "k": 2}}', path="/s?nonce=1&x=1")
    b = parts(b'{"q": 1, "metadata": {"ts": 2, "k": 2}}', path="/s?nonce=2&x=1")
    assert key(a, rules) == key(b, rules)
    other_host = MatchRules(ignore_json=(Rule.parse("other.com=/metadata/ts"),))
    assert key(a, other_host) != key(b, other_host)


def test_invalid_json_is_compared_by_bytes() -> None:
    env = fp.envelope(parts(b"{not json"))
    assert env["body"]["kind"] == "raw"
    assert key(parts(b"{not json")) != key(parts(b"{not json "))


def test_envelope_is_versioned_and_empty_body_marked() -> None:
    env = fp.envelope(parts(b"", method="GET"), version=1)
    assert env["v"] == 1 and env["body"] == {"kind": "empty"}
    env = fp.envelope(parts(b"", method="GET"))
    assert env["v"] == fp.VERSION == 2 and env["body"]["kind"] == "empty"
