"""Fingerprint v2 is exact: requests an origin server can tell apart never share a fingerprint (each
class below handed one agent another request's answer under v1), and spellings a standard calls equal
do. Runs journaled under v1 keep matching under v1."""

from __future__ import annotations

import json

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import PaidApi, Sidecars, new_run, sql
from durable_sidecar.matching import fingerprint as fp
from durable_sidecar.matching.fingerprint import RequestParts

JSON = [("Content-Type", "application/json")]


def req(path: str = "/v1/x", body: bytes = b"", headers=None, method: str = "POST") -> RequestParts:
    return RequestParts(method, "https", "api.example.com", 443, path, JSON if headers is None else headers, body)


def key(parts: RequestParts, version: int = fp.VERSION) -> str:
    return fp.fingerprint(fp.envelope(parts, version=version))


def multipart(inner: bytes) -> RequestParts:
    body = (b"--outer\r\nContent-Type: multipart/mixed; boundary=inner\r\nContent-Disposition: form-data; name=\"f\""
            b"\r\n\r\n--inner\r\nContent-Type: text/plain\r\n\r\n" + inner + b"\r\n--inner--\r\n--outer--\r\n")
    return req(body=body, headers=[("Content-Type", "multipart/form-data; boundary=outer")])


DIFFERENT = {  # each pair differs on the wire; v1 gave both the same fingerprint (but method and path case)
    "repeated query keys": (req("/x?a=1&a=2"), req("/x?a=2&a=1")),
    "invalid UTF-8 in the query": (req("/x?q=%ff"), req("/x?q=%fe")),
    "a path that starts with //": (req("//a/x"), req("//b/x")),
    "a flag and an empty value": (req("/x?flag"), req("/x?flag=")),
    "; and %3B in the query": (req("/x?a=1;b=2"), req("/x?a=1%3Bb=2")),
    "huge JSON numbers": (req(body=b'{"n": 1e400}'), req(body=b'{"n": 1e999}')),
    "JSON numbers past float precision": (req(body=b'{"n": 19.99}'), req(body=b'{"n": 19.990000000000000001}')),
    "duplicate JSON keys": (req(body=b'{"amount": 1, "amount": 2}'), req(body=b'{"amount": 2, "amount": 1}')),
    "the same bytes as another media type": (
        req(body=b"a=1", headers=[("Content-Type", "application/x-www-form-urlencoded")]),
        req(body=b"a=1", headers=[("Content-Type", "text/plain")]),
    ),
    "nested multipart parts": (multipart(b"first"), multipart(b"second")),
    "method case": (req(method="post"), req(method="POST")),
}
EQUAL = {  # spellings a standard makes one
    "percent-encoding case (RFC 3986)": (req("/a%2fb?q=%2f"), req("/a%2Fb?q=%2F")),
    "JSON layout and key order": (req(body=b'{"a": 1, "b": [1, 2]}'), req(body=b'{ "b" : [1,2], "a":1 }')),
    "JSON string escapes": (req(body=b'{"a": "\\u0041"}'), req(body=b'{"a": "A"}')),
    "multipart boundary": (
        req(body=b'--x\r\nContent-Disposition: form-data; name="f"\r\n\r\nv\r\n--x--\r\n',
            headers=[("Content-Type", "multipart/form-data; boundary=x")]),
        req(body=b'--yy\r\nContent-Disposition: form-data; name="f"\r\n\r\nv\r\n--yy--\r\n',
            headers=[("Content-Type", "multipart/form-data; boundary=yy")]),
    ),
    "the order of different query keys": (req("/x?a=1&b=2"), req("/x?b=2&a=1")),
}


@pytest.mark.parametrize("case", DIFFERENT)
def test_requests_an_origin_can_tell_apart_never_share_a_fingerprint(case: str) -> None:
    one, other = DIFFERENT[case]
    assert key(one) != key(other)


@pytest.mark.parametrize("case", EQUAL)
def test_spellings_a_standard_makes_equal_share_one(case: str) -> None:
    one, other = EQUAL[case]
    assert key(one) == key(other)


def test_v1_fingerprints_are_what_they_always_were() -> None:
    """A run journaled under v1 matches by its v1 fingerprints: the value below was computed by the
    v1 code before v2 existed."""
    parts = RequestParts("POST", "https", "API.example.com", 443, "/v1/x?b=2&a=1&a=0", JSON, b'{"z": 1, "a": [1.5, "x"]}')
    assert key(parts, version=1) == "c0e024219e8b293cd46f5e75ee0bac514eb57f549f32d52764e749c01cde93af"


token = st.text(alphabet="abcxyz019%-._~;,+", min_size=0, max_size=6)
pairs = st.lists(st.tuples(token.filter(lambda t: t and "=" not in t), st.one_of(st.none(), token)), max_size=5)


def query(items: list[tuple[str, str | None]]) -> str:
    return "&".join(k if v is None else f"{k}={v}" for k, v in items)


def canonical(items: list[tuple[str, str | None]]) -> list[tuple[str, str | None]]:
    """What a server can see of a query, up to percent-encoding case and the order of different keys."""
    def fold(text: str | None) -> str | None:
        return None if text is None else fp._fold_percent(text)
    return sorted(((fold(k), fold(v)) for k, v in items), key=lambda kv: kv[0])


@settings(max_examples=300, deadline=None)
@given(a=pairs, b=pairs)
def test_queries_share_a_fingerprint_exactly_when_a_server_sees_the_same(a, b) -> None:
    same = canonical(a) == canonical(b)
    assert (key(req("/x?" + query(a))) == key(req("/x?" + query(b)))) == same


numbers = st.from_regex(r"-?(0|[1-9][0-9]{0,25})(\.[0-9]{1,25})?([eE][+-]?[0-9]{1,4})?", fullmatch=True)


@settings(max_examples=300, deadline=None)
@given(x=numbers, y=numbers, spaced=st.booleans())
def test_json_numbers_count_as_written(x, y, spaced) -> None:
    one = req(body=f'{{"amount": {x}}}'.encode())
    other = req(body=(f'{{ "amount" : {y} }}' if spaced else f'{{"amount":{y}}}').encode())
    assert (key(one) == key(other)) == (x == y)


def test_a_run_journaled_under_v1_keeps_matching_under_v1(sidecars: Sidecars, http_api: PaidApi, pg_dsn: str) -> None:
    """A run whose steps carry v1 fingerprints (as an older sidecar journaled them) is replayed by a
    new attempt, matched under v1; a new run is journaled under v2."""
    sidecar = sidecars.start()
    run, url = new_run(), f"{http_api.url}/v1/echo?b=2&a=1"
    body = {"z": 1, "a": [1.5, "x"]}
    first = requests.post(url, json=body, proxies={"http": sidecar.proxy_url(run, "a1")}, timeout=30)
    assert first.headers["Durable-Outcome"] == "recorded"
    assert sql(pg_dsn, "SELECT fp_version FROM durable_steps WHERE run_id = %s", run) == [(2,)]
    old = RequestParts("POST", "http", "127.0.0.1", http_api.port, "/v1/echo?b=2&a=1", JSON, json.dumps(body).encode())
    sql(pg_dsn, "UPDATE durable_steps SET fp_version = 1, fingerprint = %s WHERE run_id = %s RETURNING seq",
        f"v1:{key(old, version=1)}", run)
    other = sidecars.start()  # a sidecar that never saw the run: it learns the version from the journal
    again = requests.post(url, json=body, proxies={"http": other.proxy_url(run, "a2")}, timeout=30)
    third = requests.post(url, json=body, proxies={"http": other.proxy_url(run, "a3")}, timeout=30)
    assert again.headers["Durable-Outcome"] == third.headers["Durable-Outcome"] == "replayed"
    assert again.content == third.content == first.content
    assert http_api.books()["calls"] == 1


def test_the_cost_of_a_body_counts_its_structure_not_only_its_bytes() -> None:
    """A 280 KB multipart body of 5,000 parts costs more than the 1 MiB offload threshold (it is
    parsed in the worker, not on the event loop); the same bytes as plain text stay inline."""
    parts = b"".join(f'--b\r\nContent-Disposition: form-data; name="f{n}"\r\n\r\nv\r\n'.encode() for n in range(5000))
    body = parts + b"--b--\r\n"
    assert len(body) < 400_000
    assert fp.cost(req(body=body, headers=[("Content-Type", "multipart/form-data; boundary=b")])) > 1024 * 1024
    assert fp.cost(req(body=body, headers=[("Content-Type", "text/plain")])) == len(body)


def test_a_body_too_deep_or_too_many_parted_is_digested_as_its_bytes() -> None:
    """JSON nested 1,500 deep and a multipart body past MAX_PARTS are never refused: each is digested
    as its bytes, so it matches itself and differs from any other body."""
    deep = b"[" * 1500 + b"]" * 1500
    assert key(req(body=deep)) == key(req(body=deep)) != key(req(body=b"[" * 1499 + b"]" * 1499))
    assert fp.envelope(req(body=deep))["body"]["kind"] == "raw"
    many = b"".join(b"--b\r\n\r\nv\r\n" for _ in range(fp.MAX_PARTS + 1)) + b"--b--\r\n"
    env = fp.envelope(req(body=many, headers=[("Content-Type", "multipart/form-data; boundary=b")]))
    assert env["body"]["kind"] == "raw"
