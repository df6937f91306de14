"""Pinned fingerprints: a run journaled under v1 or v2 is matched by the fingerprints it was
journaled with, so any change to what either version computes, for any kind of request, is an old
run that stops replaying (every call re-sent and re-paid). The corpus covers every branch of the
canonical envelope; the values were computed by the code that journaled them and must never change
(a new canonicalization is a new version). Also the parts read from a live mitmproxy request, and the
cost estimate that decides where fingerprinting runs."""

from __future__ import annotations

import gzip

import pytest
from mitmproxy.test import tutils

from durable_sidecar.matching import fingerprint as fp
from durable_sidecar.matching.fingerprint import MatchRules, RequestParts, Rule

JSON = [("Content-Type", "application/json")]


def req(
    path: str = "/v1/chat",
    body: bytes = b"",
    headers: list[tuple[str, str]] | None = None,
    method: str = "POST",
    host: str = "api.example.com",
    port: int = 443,
    scheme: str = "https",
) -> RequestParts:
    return RequestParts(method, scheme, host, port, path, JSON if headers is None else headers, body)


def form(boundary: str, inner: str = "") -> bytes:
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n'
        f"Content-Type: application/jsonl\r\nContent-Transfer-Encoding: base64\r\n\r\neyJhIjogMX0=\r\n"
        f"{inner}--{boundary}--\r\n"
    ).encode()


NESTED = (
    '--b1\r\nContent-Type: multipart/mixed; boundary=inner\r\nContent-Disposition: form-data; name="n"\r\n\r\n'
    "--inner\r\nContent-Type: text/plain\r\n\r\nhello\r\n--inner--\r\n"
)


def _deep(level: int) -> str:
    """A multipart body nested 10 deep: past 8 levels a part is digested whole, not parsed."""
    if level == 10:
        return "--b10\r\nContent-Type: text/plain\r\n\r\nleaf\r\n--b10--\r\n"
    return (
        f"--b{level}\r\nContent-Type: multipart/mixed; boundary=b{level + 1}\r\n\r\n"
        + _deep(level + 1)
        + f"--b{level}--\r\n"
    )


DEEP = _deep(0).encode()
RULES = MatchRules(
    ignore_json=(Rule.parse("/metadata/ts"), Rule.parse("api.example.com=/seed"), Rule.parse("other.com=/model")),
    ignore_query=(Rule.parse("cb"), Rule.parse("API.Example.com = sig")),
    match_headers=(Rule.parse("x-tenant"), Rule.parse("other.com=x-region")),
)
CHAT = (
    b'{"model": "m", "messages": [{"role": "user", "content": "h\\u00e9 \\ud83d\\ude00"}], "n": 1.50, "seed": 7,'
    b' "metadata": {"ts": 123, "k": [1, {"b": 2, "a": 1}]}}'
)
CORPUS = {
    "json chat": (req(body=CHAT), None),
    "json gzip": (req(body=gzip.compress(CHAT, mtime=0), headers=JSON + [("Content-Encoding", "gzip")]), None),
    "json +json media": (
        req(body=b'{"b":1,"a":[true,null,"x"]}', headers=[("content-type", "application/problem+json; charset=utf-8")]),
        None,
    ),
    "json duplicate keys": (req(body=b'{"a":1,"a":2,"big":1e400}'), None),
    "json broken": (req(body=b'{"a":'), None),
    "query": (req("/v1/search?q=caf%C3%A9&b=2&a=1&a=0&flag&empty=&cb=9&sig=zz#frag"), None),
    "path forms": (req("//Host/%7euser/a%2Fb/./x;p=1?"), None),
    "empty GET": (req("/", method="get", headers=[]), None),
    "plain text": (req(body=b"hello\x00\xff", headers=[("Content-Type", "text/plain")]), None),
    "no content type": (req(body=b"raw bytes", headers=[]), None),
    "multipart": (req(body=form("XyZ"), headers=[("Content-Type", "multipart/form-data; boundary=XyZ")]), None),
    "multipart nested": (
        req(body=form("b1", NESTED), headers=[("Content-Type", "multipart/form-data; boundary=b1")]),
        None,
    ),
    "multipart broken": (
        req(body=b"--x\r\nno end", headers=[("Content-Type", "multipart/form-data; boundary=y")]),
        None,
    ),
    "headers": (req(body=b"{}", headers=JSON + [("X-Tenant", "b"), ("x-tenant", "a"), ("Authorization", "k")]), None),
    "other host": (
        req(
            "/p?sig=1&cb=2",
            b'{"model":"m","seed":1}',
            JSON + [("X-Region", "eu")],
            host="Other.COM",
            port=8443,
            scheme="HTTP",
        ),
        None,
    ),
    "step key": (req(body=CHAT), "order-42"),
    "query ignored first": (req("/s?cb=1&sig=2&b=2&=x&A=1"), None),
    "charset params": (
        req(body=b"caf\xe9", headers=[("Content-Type", 'text/plain; format=flowed; charset="Xlatin-1"')]),
        None,
    ),
    "charset with =": (req(body=b"x", headers=[("Content-Type", 'text/plain; charset="ut=f"')]), None),
    "multipart nested deep": (req(body=DEEP, headers=[("Content-Type", "multipart/mixed; boundary=b0")]), None),
    "fragment after the path": (req("/a/b#frag"), None),  # a fragment is the client's: not sent, not matched
    "fragment after the query": (req("/s?a=1#frag"), None),
    "undecodable path": (req("/caf\udce9?q=\udcff"), None),  # mitmproxy's surrogateescape of bytes not UTF-8
    "empty path": (req("?q=1", method="GET", headers=[]), None),
    "multipart unnamed part": (
        req(
            body=b"--u\r\nContent-Type: text/plain\r\n\r\nx\r\n--u--\r\n",
            headers=[("Content-Type", "multipart/mixed; boundary=u")],
        ),
        None,
    ),
    "multipart unparsable type": (
        req(
            body=b"--\xc4\x81\r\n\r\nx\r\n--\xc4\x81--\r\n",
            headers=[("Content-Type", "multipart/form-data; boundary=\u0101")],
        ),
        None,
    ),
}
PINNED = {
    (1, "json chat"): "v1:5cef4f4c6e261bad256977b93836ff36f5ef9e27cf397332d764c75c7bd75a94",
    (1, "json gzip"): "v1:5cef4f4c6e261bad256977b93836ff36f5ef9e27cf397332d764c75c7bd75a94",
    (1, "json +json media"): "v1:826842c0bd1b89e9e11aeabad4d615cde56d563d1e01b7b25d2cb0e7e0d16e93",
    (1, "json duplicate keys"): "v1:ef5f7419c6d67a9c037f7a65b6161b068ac16b5a64799b19284136d90fb0df7d",
    (1, "json broken"): "v1:e06bdf9f7c9ab4b709dfbe74b4a4811a3cd413bb5f61218be79d73425ad4927b",
    (1, "query"): "v1:b5b26cd659af41238bb5e82241b82330249a4ac5b74ff7143ec00814f97021c6",
    (1, "path forms"): "v1:6aa72a79b902e5e3502223c0c8298a5921362278044e8036932857ada03100bc",
    (1, "empty GET"): "v1:70b14046e241ff3be53ebf9ba76ef8c283b2584500584629274e9ca26ee0cd81",
    (1, "plain text"): "v1:86c5a4b99140d0e3af9da95193b514c4d1773e6b84a720449eb9fef5a39e92cc",
    (1, "no content type"): "v1:50d025b1cbef23b0e7561d0d4e6dfd57a2ea5215cc412c6acf50bc44fbe6a5d5",
    (1, "multipart"): "v1:7f84df9dd36fa656ae842747edb4c5d6c81fb4a4a7a3caac1999dfa39b954625",
    (1, "multipart nested"): "v1:b61519e68f08ba5b013745de302a1d4e80488f6db2dfca5c04b5a7226743cab1",
    (1, "multipart broken"): "v1:db645c0f488a1c4b6b3d56a5f5f060a839dfb2da11896707433ddcbe79f9d349",
    (1, "headers"): "v1:5cfa711d5635bba047b5ad2cfa0b113a475264bcb8461fffe5d9731425fde65a",
    (1, "other host"): "v1:7d0335691538cd41bdb24e020d43bd4ab78042d4f0b5155b1eadc3f5328534c0",
    (1, "step key"): "key:order-42",
    (1, "fragment after the path"): "v1:013bdbbe5cdeffedd5440bff707affb28da3a5de9fee02f2ab58c836682aef06",
    (1, "fragment after the query"): "v1:67d780a53ad7c265f562a1d002dd8f844c1bdd0be8f1d002bb64e1c6cf7c9d2a",
    (1, "query ignored first"): "v1:6d5c2621bca9f8fb7b445d9c26823d96d83141f0ffe16e387ced82e001e417b1",
    (1, "charset params"): "v1:9efc6ac100c06fa7be7c7160f0472629c287204e56432cbd67a384cd4f645ff5",
    (1, "charset with ="): "v1:5c65fc2a4a97a1b48161d9a654dc51a595ee212b1c1c090dfece8e9b30dfab16",
    (1, "multipart nested deep"): "v1:c0dcba274c572f008d94481ab37632481c2ed5a7ab2c26c0f9a11e386d4d8db7",
    (1, "undecodable path"): "v1:e033328c93ff91f239c0d6cc8fbcfcd6133633d045a045e48aad22f82494d4e4",
    (1, "empty path"): "v1:9cae06770241488d4037d70e163f8908c30387e879fcb9fb015e4b58d7de052f",
    (1, "multipart unnamed part"): "v1:8dd58bb5f51d64485eaf74e9eb50abccf6cd8e6fc1f02ebe11645df5beb87822",
    (1, "multipart unparsable type"): "v1:5f8125264fe00307a8a34dee0665e0bfc9346b196e6dab158aa1bfcec5e28c0e",
    (2, "json chat"): "v2:6a984af17c9853064d8626760e9109ceca67e73ab01176b505c34690b9d10c1a",
    (2, "json gzip"): "v2:6a984af17c9853064d8626760e9109ceca67e73ab01176b505c34690b9d10c1a",
    (2, "json +json media"): "v2:2d6ef18be59ab015303ded2674efe670732c20a029cca3eeda02aba150382b26",
    (2, "json duplicate keys"): "v2:d38f2e2994f1d363d88562b2e7922b5efe464d2b60b5e5239b2170dba4d57d9b",
    (2, "json broken"): "v2:214997f00fbbb9d5109dccfda1a84678cc327547f6097e7ca662c8f2ca1b8487",
    (2, "query"): "v2:3d95416c485fb0b88f4dc60491f306653bd5c7ef6c32d4e7e3abf7979f0131ae",
    (2, "path forms"): "v2:b5d27a6f056f09c3f8943faf5762ba73cb74355a8c6ddf3495c48d40e2caccef",
    (2, "empty GET"): "v2:c55de95d634c9132cf988c084061c86eac3e8006684eb575cc5c5e390f142f2a",
    (2, "plain text"): "v2:53b64da503146839d660732e9fb3af0b98fee050533e2b13c612f2559d3c0108",
    (2, "no content type"): "v2:dd9a755e2a7dcea41b43068ae373e34df814c9836e0df649136e52c4ea2d7333",
    (2, "multipart"): "v2:acbc422c87db608c04ed56b65fd812187d39afd3d15db7145f1fcb0b355a3fb9",
    (2, "multipart nested"): "v2:a62a51f00db02bb0ab4a06747093a6a02c7322949c98c75890e806eec6a527f6",
    (2, "multipart broken"): "v2:c413f664f6e96cbf84916af1e743f127f64a840cf70d8864b9ed49543e1b2b4c",
    (2, "headers"): "v2:0d7d8963ca8893be987c4d152d3842f191b127842a4c1c632e73442b630856de",
    (2, "other host"): "v2:906b443d0753ef0068b12d041482fa6d711b01985d4db87a6b18e6aac027872d",
    (2, "step key"): "key:order-42",
    (2, "fragment after the path"): "v2:42003c31a8c63ffa983f498d1a635bdea0e4774151b81cd4c1dbec1ef7853fd0",
    (2, "fragment after the query"): "v2:53d354e304b5d68b82d4b20f717b4226676a6b91a906a57104111b403b8f2f23",
    (2, "query ignored first"): "v2:d35d8ce7b06acb6d93c3f126e09b00ea3b462b60421f623e628d0f651f003c0f",
    (2, "charset params"): "v2:ae99eda10e007394a56da1245443f6f91a66e9f47b6147e0afba14ddf1d47b6d",
    (2, "charset with ="): "v2:4dd7eaefeba049e22cfc53008f0b3cc8cc44a4f03dda797d0cfd32fc080cd2e2",
    (
        2,
        "multipart nested deep",
    ): "v2:ef60e6fa57a67f2a2a01cdf236f5eaf1d262075a61be495ae8c58aad0e84ffa2",  # was a new one each run
    (2, "undecodable path"): "v2:8c072dc560ce766d4ce79b836bf00b31095666c0edfa24f963600c6465e07c6b",
    (2, "empty path"): "v2:7730b01d9a618035f89cb38ac57b57849df8e3a00d958774866a7abc13c81805",
    (2, "multipart unnamed part"): "v2:a5e7e7004ceb03383ccb8898c6e3b08c4435a15299f14b0ba624b3f9c9fd76ae",
    (2, "multipart unparsable type"): "v2:63f95f06de5770ad2f259589761996a7fb36ee98ea77c40515687b1c898c7a07",
}


@pytest.mark.parametrize(("version", "name"), list(PINNED))
def test_a_journaled_fingerprint_never_changes(version: int, name: str) -> None:
    parts, step_key = CORPUS[name]
    assert fp.match(parts, step_key, 1 << 20, RULES, version)[2] == PINNED[(version, name)]


def test_an_unknown_version_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="^fingerprint version 3 is not known to this sidecar$"):
        fp.envelope(CORPUS["json chat"][0], RULES, 3)


def test_the_body_match_returns_is_the_decoded_one_only_when_decoding_changed_it() -> None:
    plain, encoded = CORPUS["json chat"][0], CORPUS["json gzip"][0]
    assert fp.match(plain, None, 1 << 20, RULES)[0] is None  # the body as sent: nothing to ship back
    assert fp.match(encoded, None, 1 << 20, RULES)[0] == CHAT


def test_rules_name_a_host_or_every_host() -> None:
    assert Rule.parse(" /metadata/ts ") == Rule(None, "/metadata/ts")
    assert Rule.parse("API.Example.com = /seed") == Rule("api.example.com", "/seed")
    assert Rule.parse("=/seed") == Rule(None, "/seed")
    assert Rule.parse("h.com=a=b") == Rule("h.com", "a=b")
    assert Rule.parse("h.com=/x").applies("h.com") and not Rule.parse("h.com=/x").applies("g.com")


def test_parts_default_to_no_headers_and_an_empty_body() -> None:
    bare = RequestParts("GET", "https", "h.com", 443, "/")
    assert bare.headers == [] and bare.body == b""
    assert fp.match(bare, None, 1 << 20, MatchRules()) == fp.match(
        RequestParts("GET", "https", "h.com", 443, "/", [], b""), None, 1 << 20, MatchRules()
    )


def test_parts_of_a_live_request_keep_repeated_headers_and_read_empty_bodies_as_empty() -> None:
    request = tutils.treq(method=b"POST", content=b"")
    request.headers.add("X-Tenant", "a")
    request.headers.add("X-Tenant", "b")
    raw = fp.raw_parts(request)
    assert [v for k, v in raw.headers if k == "X-Tenant"] == ["a", "b"] and raw.body == b""
    assert fp.request_parts(request).body == b""
    request.content = None
    assert fp.raw_parts(request).body == b"" and fp.request_parts(request).body == b""


def test_parts_of_a_live_request_hold_its_body_sent_and_decoded() -> None:
    request = tutils.treq(method=b"POST", content=b"")
    request.headers["Content-Encoding"] = "gzip"
    request.raw_content = gzip.compress(b'{"a": 1}')
    assert fp.raw_parts(request).body == request.raw_content
    assert fp.request_parts(request).body == b'{"a": 1}'


def test_a_multipart_body_past_max_parts_is_compared_by_its_bytes() -> None:
    def many(boundary: str, n: int) -> RequestParts:
        body = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="p"\r\n\r\nx\r\n' for _ in range(n))
        return req(
            body=(body + f"--{boundary}--\r\n").encode(),
            headers=[("Content-Type", f"multipart/form-data; boundary={boundary}")],
        )

    key = lambda parts: fp.match(parts, None, 1 << 30, MatchRules())[2]  # noqa: E731
    assert key(many("a", 3)) == key(many("b", 3))  # parsed: the boundary does not count
    # n parts: n lines that start with a newline and a boundary (the first part's has no newline, the
    # closing line's has): MAX_PARTS are parsed, one more is not
    assert key(many("a", fp.MAX_PARTS)) == key(many("b", fp.MAX_PARTS))
    assert key(many("a", fp.MAX_PARTS + 1)) != key(many("b", fp.MAX_PARTS + 1))


def test_the_cost_of_a_body_counts_its_structure() -> None:
    """What decides whether fingerprinting runs in a worker: the size, plus the parts and the JSON
    openers the parse will pay for (lifecycle.py compares it to durable_offload_bytes)."""
    assert fp.cost(req(body=b"")) == 0
    assert fp.cost(req(body=b"x" * 100, headers=[("Content-Type", "text/plain")])) == 100
    assert fp.cost(req(body=b"[[[]]]")) == 6 + 3 * fp.OPENER_COST
    assert fp.cost(req(body=b'{"a":{}}')) == 8 + 2 * fp.OPENER_COST
    multipart = CORPUS["multipart"][0]
    assert fp.cost(multipart) == len(multipart.body) + 2 * fp.PART_COST  # two parts after the first line
