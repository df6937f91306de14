"""Encryption at rest, its pure logic (store/crypto.py): what is sealed, with which key, what opens
it, and what an operator without the key sees. The journal-level guarantees (nothing readable in
pg_dump, rekey) are in test_security.py."""

from __future__ import annotations

import base64
import json

import pytest

from durable_sidecar.store import crypto
from durable_sidecar.store.crypto import Keyring, KeyringError

K1 = "k1:" + base64.b64encode(bytes(range(32))).decode()
K2 = "k2:" + base64.b64encode(bytes(range(32, 64))).decode()


def test_a_sealed_value_names_its_key_and_hides_its_bytes() -> None:
    ring = Keyring(K1)
    sealed = ring.seal(b"card 4242")
    assert sealed.startswith(b"DSE1\x02k1") and b"card" not in sealed
    assert crypto.is_sealed(sealed) and crypto.sealed_kid(sealed) == "k1"
    assert len(sealed) == 4 + 1 + 2 + 12 + len(b"card 4242") + 16  # magic, kid, nonce, ciphertext, tag
    assert ring.open(sealed) == b"card 4242"
    assert ring.seal(b"card 4242") != sealed  # a fresh nonce each time


def test_the_first_key_seals_and_every_key_opens() -> None:
    old, both = Keyring(K1), Keyring(f" {K2} , {K1},")
    assert both.active == "k2" and set(both.keys) == {"k1", "k2"}
    assert both.open(old.seal(b"x")) == b"x"
    assert crypto.sealed_kid(both.seal(b"x")) == "k2"


def test_without_a_key_nothing_is_sealed_and_clear_values_pass() -> None:
    ring = Keyring("")
    assert not ring.enabled and ring.active is None
    assert ring.seal(b"x") == b"x" and Keyring(K1).open(b"plain") == b"plain"
    assert crypto.seal_json(ring, {"a": 1}) == {"a": 1}


def test_a_value_sealed_with_a_key_not_given_names_that_key() -> None:
    sealed = Keyring(K2).seal(b"x")
    with pytest.raises(
        KeyringError,
        match="^journal entry is encrypted with key 'k2', which this process was not given"
        " \\(--set durable_encryption_key or \\$DURABLE_ENCRYPTION_KEY\\)$",
    ):
        Keyring(K1).open(sealed)


def test_a_wrong_key_under_the_right_id_is_an_error_not_garbage() -> None:
    other = "k1:" + base64.b64encode(bytes(32)).decode()
    with pytest.raises(KeyringError, match="^journal entry does not decrypt with key 'k1': wrong key for that key id$"):
        Keyring(other).open(Keyring(K1).seal(b"x"))


def test_a_value_moved_to_another_key_id_does_not_open() -> None:
    """The key id is authenticated: relabelling a value (same key bytes, another id) breaks it."""
    same_key = "k9:" + K1.split(":", 1)[1]
    sealed = Keyring(K1).seal(b"x")
    relabelled = b"DSE1\x02k9" + sealed[7:]
    with pytest.raises(KeyringError, match="does not decrypt"):
        Keyring(same_key).open(relabelled)


@pytest.mark.parametrize(
    "spec",
    [
        "k1",
        "k1:",
        ":" + K1.split(":", 1)[1],
        "k1:not-base64!",
        "k1:" + base64.b64encode(bytes(31)).decode(),
        "bad id:" + K1.split(":", 1)[1],
    ],
)
def test_a_malformed_key_is_refused(spec: str) -> None:
    with pytest.raises(KeyringError):
        Keyring(spec)


def test_a_malformed_key_is_named_and_a_stray_character_is_not_skipped() -> None:
    """A key with a typo must not decode to some other 32 bytes (base64 that skips what it does not know)."""
    with pytest.raises(KeyringError, match="^encryption key 'k1': expected KID:BASE64 of 32 bytes \\(durable keygen"):
        Keyring(K1 + "*")
    with pytest.raises(KeyringError, match="^encryption key '\\?': expected KID:BASE64"):
        Keyring(":short")


def test_key_ids_and_generated_keys() -> None:
    assert crypto.validate_kid("2026-11.a_b") == "2026-11.a_b"
    for kid in ("", "a b", "x" * 65, "ü"):
        with pytest.raises(KeyringError, match=f"^key id {kid!r}: use 1-64 characters"):
            crypto.validate_kid(kid)
    assert Keyring(crypto.new_key_spec()).active == "k1"
    spec = crypto.new_key_spec("k7")
    ring = Keyring(spec)
    assert ring.active == "k7" and spec != crypto.new_key_spec("k7")
    with pytest.raises(KeyringError):
        crypto.new_key_spec("no good")


def test_the_key_comes_from_the_option_else_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DURABLE_ENCRYPTION_KEY", K2)  # the documented name
    assert Keyring.from_option("").active == "k2"
    assert Keyring.from_option(K1).active == "k1"
    monkeypatch.delenv("DURABLE_ENCRYPTION_KEY")
    assert not Keyring.from_option("").enabled


def test_json_is_sealed_whole_and_opened_back() -> None:
    ring = Keyring(K1)
    stored = crypto.seal_json(ring, [["authorization", "Bearer sk-1"]])
    assert set(stored) == {"sealed"} and "sk-1" not in json.dumps(stored)
    assert crypto.open_json(ring, stored) == [["authorization", "Bearer sk-1"]]
    assert crypto.open_json(ring, {"sealed": "x", "other": 1}) == {"sealed": "x", "other": 1}  # not a sealed value
    assert crypto.open_json(ring, [1]) == [1]


def test_a_url_keeps_its_origin_in_clear_and_seals_the_rest() -> None:
    ring = Keyring(K1)
    stored = crypto.seal_url(ring, "https://api.x.com:8443/v1/users/42?token=abc")
    assert stored.startswith("https://api.x.com:8443/sealed:") and "users" not in stored and "abc" not in stored
    assert crypto.open_url(ring, stored) == "https://api.x.com:8443/v1/users/42?token=abc"
    assert crypto.open_url(Keyring(K2), stored) == "https://api.x.com:8443/[sealed]"  # no key: the host still shows
    assert crypto.open_url(ring, "https://api.x.com/sealed:%%%") == "https://api.x.com/[sealed]"
    assert crypto.seal_url(Keyring(""), "https://h/p?q=1") == "https://h/p?q=1"
    assert crypto.open_url(ring, "https://h/p?q=1") == "https://h/p?q=1"


def test_an_allow_listed_path_stays_in_clear_but_never_its_query() -> None:
    ring = Keyring(K1)
    stored = crypto.seal_url(ring, "https://h/v1/chat/completions?key=abc", clear_path=True)
    assert stored.startswith("https://h/v1/chat/completions?sealed:") and "abc" not in stored
    assert crypto.open_url(ring, stored) == "https://h/v1/chat/completions?key=abc"
    assert crypto.open_url(Keyring(K2), stored) == "https://h/v1/chat/completions?[sealed]"
    assert crypto.seal_url(ring, "https://h/v1/chat", clear_path=True) == "https://h/v1/chat"
    assert crypto.open_url(ring, crypto.seal_url(ring, "https://h/x")) == "https://h/x"  # no query at all


def test_resealing_a_url_moves_it_to_the_active_key_and_keeps_its_clear_path() -> None:
    old, new = Keyring(K1), Keyring(f"{K2},{K1}")
    for url, clear in (("https://h/a/b?c=1", False), ("https://h/a/b?c=1", True)):
        resealed = crypto.reseal_url(new, crypto.seal_url(old, url, clear_path=clear))
        assert crypto.open_url(Keyring(K2), resealed) == url
        assert ("/a/b?sealed:" in resealed) == clear


def test_a_row_is_opened_column_by_column() -> None:
    ring = Keyring(K1)
    row = {
        "url": crypto.seal_url(ring, "https://h/p"),
        "request_body": ring.seal(b"req"),
        "response_body": memoryview(ring.seal(b"resp")),
        "envelope": crypto.seal_json(ring, {"e": 1}),
        "request_headers": crypto.seal_json(ring, []),
        "response_headers": crypto.seal_json(ring, [["a", "b"]]),
        "error": None,
        "seq": 3,
    }
    assert crypto.open_row(ring, row) == {
        "url": "https://h/p",
        "request_body": b"req",
        "response_body": b"resp",
        "envelope": {"e": 1},
        "request_headers": [],
        "response_headers": [["a", "b"]],
        "error": None,
        "seq": 3,
    }
    trailers = {"response_trailers": crypto.seal_json(ring, [["grpc-status", "0"]])}
    assert crypto.open_row(ring, trailers) == {"response_trailers": [["grpc-status", "0"]]}
