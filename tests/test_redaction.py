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
