"""Property-based tests (hypothesis) for the parsers that see hostile input: they never raise
anything but their own clear errors, and canonical forms are stable."""

from __future__ import annotations

import base64
import json
from urllib.parse import parse_qs, urlsplit

from hypothesis import given, settings
from hypothesis import strategies as st

from durable_sidecar.matching import fingerprint, identity
from durable_sidecar.matching.fingerprint import RequestParts
from durable_sidecar.matching.redaction import Redactor

header_names = st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"), min_size=1, max_size=30)
headers = st.lists(st.tuples(header_names, st.text(max_size=60)), max_size=8)
content_types = st.sampled_from(["application/json", "application/problem+json", "multipart/form-data; boundary=xyz",
                                 "multipart/form-data", "text/plain", "", "application/x-www-form-urlencoded"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(method=st.text(max_size=10), path=st.text(max_size=80), host=st.text(max_size=40),
       port=st.integers(0, 70000), hdrs=headers, body=st.binary(max_size=300), ctype=content_types,
       noise=st.text(max_size=40))
def test_envelope_never_raises_and_ignores_headers_that_do_not_match(method, path, host, port, hdrs, body, ctype, noise) -> None:
    """Whatever the request, its envelope is built and serialisable (it is journaled as JSONB), and
    headers outside the allow-list (User-Agent, Authorization, trace ids) leave its fingerprint alone."""
    parts = RequestParts(method, "https", host, port, path, hdrs + [("Content-Type", ctype)], body)
    env = fingerprint.envelope(parts)
    json.dumps(env)
    noisy = RequestParts(method, "https", host, port, path,
                         [("User-Agent", f"agent/{noise}"), ("Authorization", f"Bearer {noise}"), ("X-Request-Id", noise)]
                         + hdrs + [("Content-Type", ctype)], body)
    assert fingerprint.fingerprint(fingerprint.envelope(noisy)) == fingerprint.fingerprint(env)


@settings(max_examples=200, deadline=None)
@given(doc=st.dictionaries(st.text(max_size=10), json_values, max_size=6), indent=st.sampled_from([None, 0, 2]))
def test_json_bodies_match_whatever_their_layout(doc, indent) -> None:
    compact = RequestParts("POST", "https", "h", 443, "/", [("Content-Type", "application/json")], json.dumps(doc).encode())
    pretty = RequestParts("POST", "https", "h", 443, "/", [("Content-Type", "application/json")],
                          json.dumps(dict(reversed(list(doc.items()))), indent=indent).encode())
    assert fingerprint.fingerprint(fingerprint.envelope(compact)) == fingerprint.fingerprint(fingerprint.envelope(pretty))


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: "Basic " + base64.b64encode(b).decode())))
def test_proxy_authorization_parser_only_raises_identity_errors(value) -> None:
    try:
        creds = identity.parse_proxy_authorization(value)
    except identity.IdentityError:
        return
    for part in (creds.run, creds.attempt):
        assert part is None or identity.validate_id(part, "id") == part


@settings(max_examples=300, deadline=None)
@given(hdrs=st.dictionaries(st.sampled_from(["durable-run-id", "durable-attempt", "durable-step-key", "durable-token"]),
                            st.text(max_size=140), max_size=4))
def test_identity_resolution_only_raises_identity_errors(hdrs) -> None:
    try:
        ident = identity.resolve(hdrs, identity.Credentials(), None, None, "run-default", "attempt-default")
    except identity.IdentityError:
        return
    assert identity.validate_id(ident.run, "run") and identity.validate_id(ident.attempt, "attempt")


@settings(max_examples=200, deadline=None)
@given(fields=st.lists(st.tuples(st.binary(min_size=1, max_size=20), st.binary(max_size=40)), max_size=10))
def test_control_split_keeps_every_other_header_in_order(fields) -> None:
    fields = tuple(fields)
    control, kept = identity.split_control(fields)
    assert list(kept) == [f for f in fields if not (f[0].lower().startswith(b"durable-") or f[0].lower() == b"proxy-authorization")]


@settings(max_examples=200, deadline=None)
@given(url=st.text(max_size=120), body=st.binary(max_size=200), pointer=st.text(max_size=20))
def test_redaction_never_raises_and_hides_only_secrets(url, body, pointer) -> None:
    redactor = Redactor(b"k", json_pointers=["/" + pointer])
    redacted_url = redactor.url("https://h/p?" + url)
    assert redacted_url.startswith("https://h/p")  # only the query may change
    assert isinstance(redactor.body(body, "application/json"), bytes)
    assert redactor.body(body, "text/plain") == body  # only JSON bodies are rewritten
    (auth_name, auth), (other_name, other) = redactor.headers([(b"Authorization", body), (b"X-Other", body)])
    assert auth_name == b"Authorization" and auth.startswith(b"redacted:hmac-sha256:")
    assert (other_name, other) == (b"X-Other", body)
    secret = redactor.url(f"https://h/p?api_key={body.hex()}x&page=2")
    assert parse_qs(urlsplit(secret).query) == {"api_key": [redactor.digest((body.hex() + "x").encode())], "page": ["2"]}
