"""What never reaches the journal (or a log) in clear: credentials in headers, query strings and
chosen JSON body fields are stored as a keyed hash (HMAC-SHA256) of their value.

The hash lets an operator tell two keys apart without the journal holding either; being keyed, it
cannot be brute-forced from a dump of the journal alone. The key: option `durable_redact_key`, else
$DURABLE_REDACT_KEY, else a random key kept in $DURABLE_HOME/redact.key (0600), made on first use.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit, urlunsplit

from . import jsonpointer

# header and query parameter names that carry credentials (matched anywhere in the lower-case name)
SECRET_NAMES = re.compile(
    r"authorization|api[-_]?key|secret|passw(or)?d|pwd|cookie|signature|credential"
    r"|(^|[-_])(session|token|key|auth|sig|code|pass|otp)($|[-_])"
)
# credentials inside a value, whatever its name: the password of a URL or DSN (scheme://user:PASS@)
USERINFO = re.compile(r"([a-z][a-z0-9+.-]*://[^/:@\s?#]*:)([^@/\s?#]+)(@)", re.IGNORECASE)
# path segments that are credentials: a Telegram bot token (/bot<id>:<secret>/), and keys by their
# well-known prefixes (sk-..., ghp_..., xoxb-...)
SECRET_SEGMENT = re.compile(
    r"^(bot\d+:[A-Za-z0-9_-]{20,}|(sk|pk|rk|ghp|gho|ghs|github_pat|xox[abpr])[-_][A-Za-z0-9_-]{16,})$"
)
MARK = "redacted:"


def load_key(option: str, home: Path) -> bytes:
    if option or os.environ.get("DURABLE_REDACT_KEY"):
        return (option or os.environ["DURABLE_REDACT_KEY"]).encode()
    path = home / "redact.key"
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


class Redactor:
    def __init__(self, key: bytes, extra_headers: Iterable[str] = (), json_pointers: Iterable[str] = ()) -> None:
        self.key = key
        self.extra = {h.lower() for h in extra_headers}
        self.pointers = list(json_pointers)

    def digest(self, value: bytes) -> str:
        return MARK + "hmac-sha256:" + hmac.new(self.key, value, hashlib.sha256).hexdigest()[:16]

    def secret_name(self, name: str) -> bool:
        lower = name.lower()
        return lower in self.extra or (bool(SECRET_NAMES.search(lower)) and "idempotency" not in lower)

    def headers(self, fields: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        return [
            (name, self.digest(value).encode()) if self.secret_name(name.decode("latin-1")) else (name, value)
            for name, value in fields
        ]

    def value(self, value: str) -> str:
        """A value with the credentials it carries inside hashed (a URL's or DSN's password)."""
        if "://" not in value:
            return value
        return USERINFO.sub(lambda m: m.group(1) + self.digest(m.group(2).encode()) + m.group(3), value)

    def _raw(self, value: str) -> str:
        """A query value as sent (percent-encoded): redacted in its decoded form if it carries a password."""
        decoded = unquote_plus(value)
        redacted = self.value(decoded)
        return value if redacted == decoded else redacted

    def path(self, path: str) -> str:
        """A path with credential segments (a bot token, a prefixed key) hashed."""
        if not any(SECRET_SEGMENT.match(segment) for segment in path.split("/")):
            return path
        return "/".join(self.digest(s.encode()) if SECRET_SEGMENT.match(s) else s for s in path.split("/"))

    def url(self, url: str) -> str:
        """The URL with credentials hashed: credential-looking query parameters (`?key=`,
        `access_token=`, `code=`...), passwords of URLs inside values, and credential path segments."""
        split = urlsplit(url)
        path = self.path(split.path)
        if not split.query:
            return url if path == split.path else urlunsplit(split._replace(path=path))
        pairs = parse_qsl(split.query, keep_blank_values=True)
        redacted = [(k, self.digest(v.encode()) if self.secret_name(k) else self.value(v)) for k, v in pairs]
        if redacted == pairs and path == split.path:
            return url
        return urlunsplit(split._replace(path=path, query=urlencode(redacted)))

    def envelope(self, env: dict[str, Any]) -> dict[str, Any]:
        """A fingerprint envelope as stored: credential-looking query values and headers hashed.
        (The fingerprint itself is taken before, so matching is unaffected.)"""
        redacted = dict(env)
        redacted["path"] = self.path(env.get("path", ""))
        redacted["query"] = [  # v2 keeps `?flag` (value None) apart from `?flag=`
            [k, v if v is None else self.digest(v.encode()) if self.secret_name(unquote_plus(k)) else self._raw(v)]
            for k, v in env.get("query", [])
        ]
        if "headers" in env:
            redacted["headers"] = [
                [k, self.digest(v.encode()) if self.secret_name(k) else v] for k, v in env["headers"]
            ]
        return redacted

    def rewrites(self, content_type: str) -> bool:
        """Would `body` change a body of this type? (Only JSON, only with pointers configured.)"""
        return bool(self.pointers) and "json" in content_type.lower()

    def body(self, body: bytes, content_type: str) -> bytes:
        """A JSON body with the configured pointers hashed; anything else unchanged."""
        if not self.rewrites(content_type):
            return body
        try:
            doc = json.loads(body)
        except ValueError:
            return body
        changed = False
        for pointer in self.pointers:
            if found := jsonpointer.locate(doc, pointer):
                container, key = found
                container[key] = self.digest(json.dumps(container[key]).encode())
                changed = True
        return json.dumps(doc).encode() if changed else body
