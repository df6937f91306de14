"""Redaction (pure logic): which key hashes the secrets, and which values it hides."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from durable_sidecar.matching import redaction


def test_the_key_comes_from_the_option_else_the_environment_else_a_private_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DURABLE_REDACT_KEY", raising=False)
    assert redaction.load_key("from-option", tmp_path) == b"from-option"
    monkeypatch.setenv("DURABLE_REDACT_KEY", "from-env")
    assert redaction.load_key("", tmp_path) == b"from-env"
    assert redaction.load_key("from-option", tmp_path) == b"from-option"  # the option wins
    monkeypatch.delenv("DURABLE_REDACT_KEY")
    home = tmp_path / "not" / "yet" / "made"
    made = redaction.load_key("", home)
    key_file = home / "redact.key"  # where docs/security.md says it is
    assert made == key_file.read_text().encode() and len(made) == 64
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert redaction.load_key("", home) == made  # made once, kept


def test_json_fields_named_by_pointer_are_hashed() -> None:
    redactor = redaction.Redactor(b"k", json_pointers=["/card/number"])
    body = json.dumps({"card": {"number": "4242424242424242"}, "amount": 3}).encode()
    stored = json.loads(redactor.body(body, "application/json"))
    assert stored["amount"] == 3 and stored["card"]["number"].startswith(redaction.MARK)
    assert "4242424242424242" not in json.dumps(stored)


def test_the_idempotency_key_is_no_secret() -> None:
    """It names the call upstream and is re-sent as it was: kept in clear, though `key` is in its name."""
    redactor = redaction.Redactor(b"k")
    assert not redactor.secret_name("Idempotency-Key") and redactor.secret_name("X-Api-Key")


BOT = "bot123456:" + "A" * 24  # a Telegram bot token as a path segment


def test_the_password_inside_a_url_value_is_hashed_and_nothing_else() -> None:
    r = redaction.Redactor(b"k")
    assert r.value("postgresql://app:s3cret@db.internal:5432/jobs") == (
        "postgresql://app:" + r.digest(b"s3cret") + "@db.internal:5432/jobs"
    )
    assert r.value("no scheme: user:pass@host") == "no scheme: user:pass@host"
    assert r.value("https://host/path") == "https://host/path"


def test_a_credential_path_segment_is_hashed_with_or_without_a_query() -> None:
    r = redaction.Redactor(b"k")
    hashed = r.digest(BOT.encode())
    assert r.url(f"https://api.telegram.org/{BOT}/sendMessage") == f"https://api.telegram.org/{hashed}/sendMessage"
    assert r.url(f"https://api.telegram.org/{BOT}/send?chat=1") == f"https://api.telegram.org/{hashed}/send?chat=1"
    assert r.url("https://api.example.com/v1/send?chat=1") == "https://api.example.com/v1/send?chat=1"


def test_blank_query_values_survive_redaction() -> None:
    r = redaction.Redactor(b"k")
    redacted = r.url("https://h/search?flag=&api_key=abc&q=x")
    assert redacted == "https://h/search?" + "&".join(
        ["flag=", "api_key=" + r.digest(b"abc").replace(":", "%3A"), "q=x"]
    )


def test_the_envelope_keeps_its_path_with_credential_segments_hashed() -> None:
    r = redaction.Redactor(b"k")
    env = {"v": 2, "method": "POST", "path": f"/{BOT}/sendMessage", "query": [["flag", None], ["token", "t"]]}
    stored = r.envelope(env)
    assert stored["path"] == f"/{r.digest(BOT.encode())}/sendMessage"
    assert stored["query"] == [["flag", None], ["token", r.digest(b"t")]]
    assert r.envelope({"v": 2, "method": "GET"})["path"] == ""  # an envelope with no path stays without one


def test_matched_headers_in_the_envelope_are_hashed_when_they_are_credentials() -> None:
    r = redaction.Redactor(b"k")
    env = {"v": 2, "path": "/", "headers": [["authorization", "Bearer a"], ["x-tenant", "acme"]]}
    assert r.envelope(env)["headers"] == [["authorization", r.digest(b"Bearer a")], ["x-tenant", "acme"]]


def test_a_body_is_rewritten_only_when_a_pointer_finds_something() -> None:
    assert not redaction.Redactor(b"k").rewrites("application/json")  # no pointers: bodies are never parsed
    r = redaction.Redactor(b"k", json_pointers=["/card/number"])
    assert r.rewrites("application/json; charset=utf-8") and not r.rewrites("text/plain")
    untouched = b'{"amount":  9,   "currency": "eur"}'  # not as json.dumps writes it
    assert r.body(untouched, "application/json") == untouched  # byte for byte: nothing to hash
