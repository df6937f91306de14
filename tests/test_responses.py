"""Rebuilding journaled responses byte for byte (pure logic)."""

from __future__ import annotations

import gzip
import json

from durable_sidecar.steps import responses


def test_gzip_body_is_kept_encoded_with_a_correct_length() -> None:
    body = gzip.compress(b'{"a": 1}' * 50, mtime=0)
    headers = [(b"Content-Type", b"application/json"), (b"Content-Encoding", b"gzip"), (b"Content-Length", b"999")]
    r = responses.rebuild("GET", b"HTTP/1.1", 200, "OK", headers, body)
    assert r.raw_content == body
    assert r.headers.fields == ((b"Content-Type", b"application/json"), (b"Content-Encoding", b"gzip"), (b"Content-Length", str(len(body)).encode()))
    assert r.content == b'{"a": 1}' * 50  # decodes to what the origin sent


def test_chunked_origin_gets_content_length_and_loses_framing() -> None:
    headers = [(b"Transfer-Encoding", b"chunked"), (b"Connection", b"keep-alive"), (b"X-A", b"1")]
    r = responses.rebuild("GET", b"HTTP/1.1", 200, "OK", headers, b"hello")
    assert r.headers.fields == ((b"X-A", b"1"), (b"content-length", b"5"))


def test_duplicate_headers_keep_order_and_case() -> None:
    headers = [(b"Set-Cookie", b"a=1"), (b"X-Other", b"x"), (b"Set-Cookie", b"b=2")]
    r = responses.rebuild("GET", b"HTTP/1.1", 200, "OK", headers, b"")
    assert r.headers.get_all("set-cookie") == ["a=1", "b=2"]
    assert [k for k, _ in r.headers.fields][:3] == [b"Set-Cookie", b"X-Other", b"Set-Cookie"]


def test_bodyless_responses() -> None:
    r = responses.rebuild("GET", b"HTTP/1.1", 204, "No Content", [(b"X", b"1")], b"")
    assert r.headers.fields == ((b"X", b"1"),) and r.raw_content == b""
    head = responses.rebuild("HEAD", b"HTTP/1.1", 200, "OK", [(b"Content-Length", b"1234")], b"")
    assert head.headers["content-length"] == "1234" and head.raw_content == b""


def test_refusal_is_json_and_labelled() -> None:
    r = responses.refusal(503, "journal unavailable", run="r1", step=None)
    assert r.status_code == 503 and r.headers["Durable-Outcome"] == "refused"
    assert json.loads(r.content) == {"error": "durable-sidecar", "reason": "journal unavailable", "run": "r1"}


def test_unchecked_response_equals_the_checked_constructor() -> None:
    """The fast path skips mitmproxy's type check; it must build exactly what the constructor builds."""
    from mitmproxy import http

    headers = http.Headers([(b"Content-Type", b"application/json"), (b"Content-Length", b"2")])
    fast = responses.unchecked_response(b"HTTP/1.1", 201, b"Created", headers, b"{}", 12.5)
    checked = http.Response(b"HTTP/1.1", 201, b"Created", headers, b"{}", None, 12.5, 12.5)
    assert fast.get_state() == checked.get_state()
    assert fast.status_code == 201 and fast.text == "{}" and fast.stream is False


def test_labels_replace_any_the_answer_carried_and_leave_the_rest_in_order() -> None:
    """An upstream that is itself behind a sidecar answers with Durable-* headers of its own: the
    agent sees ours, once each, and every other header as it came."""
    headers = [(b"X-A", b"1"), (b"durable-outcome", b"recorded"), (b"Set-Cookie", b"a=1"), (b"Durable-Step", b"9")]
    r = responses.rebuild("GET", b"HTTP/1.1", 200, "OK", headers, b"hi")
    responses.label(r, "run-1", 3, "replayed")
    assert r.headers.fields == (
        (b"X-A", b"1"), (b"Set-Cookie", b"a=1"), (b"content-length", b"2"),
        (b"Durable-Run-Id", b"run-1"), (b"Durable-Step", b"3"), (b"Durable-Outcome", b"replayed"),
    )
    responses.label(r, None, None, "refused")
    assert r.headers.get_all("durable-outcome") == ["refused"] and "durable-step" not in r.headers
