"""Encryption at rest for journaled bodies and headers: AES-256-GCM with a key id per value.

Keys come as `KID:BASE64KEY[,KID:BASE64KEY...]` (option `durable_encryption_key` or the environment
variable DURABLE_ENCRYPTION_KEY); the first is the active key, the others are only read, so keys
can be rotated (`durable rekey`). A sealed value is `DSE1 | len(kid) | kid | nonce | ciphertext+tag`,
so every row says which key it needs, and a wrong key gives a clear error, never garbage.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"DSE1"
ENV = "DURABLE_ENCRYPTION_KEY"
KID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # kept in every sealed value, after a one-byte length


class KeyringError(ValueError):
    """A key that cannot be parsed, or a sealed value this keyring cannot open."""


def validate_kid(kid: str) -> str:
    if not KID.fullmatch(kid):
        raise KeyringError(f"key id {kid!r}: use 1-64 characters of A-Z a-z 0-9 . _ - (e.g. k2, 2026-11)")
    return kid


def new_key_spec(kid: str = "k1") -> str:
    """A fresh `KID:BASE64KEY` for `durable keygen`."""
    validate_kid(kid)
    return f"{kid}:{base64.b64encode(secrets.token_bytes(32)).decode()}"


class Keyring:
    def __init__(self, spec: str) -> None:
        self.keys: dict[str, AESGCM] = {}
        self.active: str | None = None
        for item in filter(None, (part.strip() for part in spec.split(","))):
            kid, sep, b64 = item.partition(":")
            try:
                key = base64.b64decode(b64, validate=True)
            except binascii.Error:
                key = b""
            if not sep or not kid or len(key) != 32:
                raise KeyringError(
                    f"encryption key {kid or '?'!r}: expected KID:BASE64 of 32 bytes (durable keygen makes one)"
                )
            validate_kid(kid)
            self.keys[kid] = AESGCM(key)
            self.active = self.active or kid

    @classmethod
    def from_option(cls, option: str) -> Keyring:
        return cls(option or os.environ.get(ENV, ""))

    @property
    def enabled(self) -> bool:
        return self.active is not None

    def seal(self, data: bytes) -> bytes:
        if self.active is None:
            return data
        kid = self.active.encode()
        nonce = secrets.token_bytes(12)
        return MAGIC + bytes([len(kid)]) + kid + nonce + self.keys[self.active].encrypt(nonce, data, MAGIC + kid)

    def open(self, data: bytes) -> bytes:
        if not is_sealed(data):
            return data
        kid = sealed_kid(data)
        if kid not in self.keys:
            raise KeyringError(
                f"journal entry is encrypted with key {kid!r}, which this process was not given "
                f"(--set durable_encryption_key or ${ENV})"
            )
        start = len(MAGIC) + 1 + len(kid.encode())
        nonce, ciphertext = data[start : start + 12], data[start + 12 :]
        try:
            return self.keys[kid].decrypt(nonce, ciphertext, MAGIC + kid.encode())
        except InvalidTag as e:
            raise KeyringError(f"journal entry does not decrypt with key {kid!r}: wrong key for that key id") from e


def is_sealed(data: bytes) -> bool:
    return data[:4] == MAGIC


def sealed_kid(data: bytes) -> str:
    return data[5 : 5 + data[4]].decode()


def seal_json(keyring: Keyring, value: object) -> object:
    """A JSON value as stored: itself, or {"sealed": base64} when encryption is on."""
    if not keyring.enabled:
        return value
    return {"sealed": base64.b64encode(keyring.seal(json.dumps(value).encode())).decode()}


def open_json(keyring: Keyring, value: object) -> object:
    if isinstance(value, dict) and set(value) == {"sealed"}:
        return json.loads(keyring.open(base64.b64decode(value["sealed"])))
    return value


URL_MARK = "sealed:"  # where the sealed part of a stored URL begins


def seal_url(keyring: Keyring, url: str, clear_path: bool = False) -> str:
    """A URL as stored: itself, or with a key only its origin in clear (what an operator needs to find
    a call) and the rest sealed; `clear_path` keeps the path too (an allow-listed path), not the query."""
    if not keyring.enabled:
        return url
    split = urlsplit(url)
    origin = f"{split.scheme}://{split.netloc}"
    if clear_path:
        query = split.query
        return origin + split.path + ("?" + URL_MARK + _b64(keyring.seal(query.encode())) if query else "")
    rest = split.path + ("?" + split.query if split.query else "")
    return origin + "/" + URL_MARK + _b64(keyring.seal(rest.encode()))


def open_url(keyring: Keyring, stored: str) -> str:
    """A stored URL opened; without the key its sealed part shows as `[sealed]` (never an error: an
    operator without the key still sees which host a step called)."""
    head, mark, blob = stored.partition(URL_MARK)
    if not mark:
        return stored
    try:
        sealed = base64.urlsafe_b64decode(blob)
        if not is_sealed(sealed):  # damaged: never show it as a URL with no path
            raise KeyringError("not a sealed value")
        rest = keyring.open(sealed).decode()
    except (KeyringError, binascii.Error, UnicodeDecodeError):
        return head + "[sealed]"
    return head + rest if head.endswith("?") else head[:-1] + rest


def reseal_url(keyring: Keyring, stored: str) -> str:
    """A stored URL sealed again with the active key, its path kept in clear if it was."""
    return seal_url(keyring, open_url(keyring, stored), clear_path="?" + URL_MARK in stored)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


SEALED_COLUMNS = ("request_body", "response_body")
SEALED_JSON_COLUMNS = ("envelope", "request_headers", "response_headers", "response_trailers")


def open_row(keyring: Keyring, row: dict) -> dict:
    """A journal row with its sealed columns opened (those present in the row)."""
    if row.get("url") is not None:
        row["url"] = open_url(keyring, row["url"])
    for column in SEALED_COLUMNS:
        if row.get(column) is not None:
            row[column] = keyring.open(bytes(row[column]))
    for column in SEALED_JSON_COLUMNS:
        if row.get(column) is not None:
            row[column] = open_json(keyring, row[column])
    return row
