"""Who is calling: the run, the attempt and an optional explicit step key of a request.

Sources, first match wins (DESIGN.md section 1): `Durable-*` request headers, proxy credentials
(`http://RUN:ATTEMPT@proxy`, remembered per client connection after an HTTPS CONNECT), the
`durable_run` / `durable_attempt` options, and finally ids minted when the proxy started.
Each of run and attempt is taken from the first source that has it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

RUN_HEADER = "Durable-Run-Id"
ATTEMPT_HEADER = "Durable-Attempt"
STEP_KEY_HEADER = "Durable-Step-Key"
TOKEN_HEADER = "Durable-Token"
PROXY_AUTH_HEADER = "Proxy-Authorization"

_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")


class IdentityError(ValueError):
    """A run id, attempt id or step key that breaks the id rules; the agent gets a 400."""


@dataclass(frozen=True)
class Credentials:
    """Run, attempt and run token carried by proxy credentials `RUN:ATTEMPT[~TOKEN]` (any may be absent)."""

    run: str | None = None
    attempt: str | None = None
    token: str | None = None


@dataclass(frozen=True)
class Identity:
    run: str
    attempt: str
    step_key: str | None = None
    source: str = "default"  # where the run came from
    attempt_source: str = "default"


def validate_id(value: str, what: str) -> str:
    if not _ID.fullmatch(value):
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise IdentityError(f"invalid {what} {shown!r}: use 1-128 characters of A-Z a-z 0-9 . _ : @ -")
    return value


def mint_id(prefix: str) -> str:
    """A fresh id that sorts by time, for runs and attempts nobody named."""
    return f"{prefix}-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"


@functools.lru_cache(maxsize=4096)
def parse_proxy_authorization(value: str | None) -> Credentials:
    """`Basic base64(run:attempt)` -> Credentials. Anything else is an IdentityError.

    Cached: an agent sends the same header on every call of a run, and this sits on every call's path."""
    if not value:
        return Credentials()
    from mitmproxy.addons.proxyauth import parse_http_basic_auth  # loaded in the sidecar; the CLI need not pay for it

    try:
        _, user, password = parse_http_basic_auth(value)
    except ValueError as e:
        raise IdentityError(f"unreadable Proxy-Authorization ({e}); expected Basic RUN:ATTEMPT") from e
    attempt, _, token = password.partition("~")
    return Credentials(
        run=validate_id(user, "run id (proxy user name)") if user else None,
        attempt=validate_id(attempt, "attempt id (proxy password)") if attempt else None,
        token=token or None,
    )


def run_token(secret: str, run: str) -> str:
    """The token that opens `run` when the sidecar has `durable_auth_secret`: HMAC-SHA256, base64url."""
    digest = hmac.new(secret.encode(), run.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode()[:32]


def token_ok(secret: str, run: str, token: str | None) -> bool:
    return token is not None and hmac.compare_digest(token, run_token(secret, run))


def resolve(
    headers: dict[str, str],
    credentials: Credentials,
    option_run: str | None,
    option_attempt: str | None,
    default_run: str,
    default_attempt: str,
) -> Identity:
    """Pick run, attempt and step key from the sources in precedence order.

    `headers` maps lower-case header names to values (only the Durable-* ones matter).
    """
    header_run = headers.get(RUN_HEADER.lower()) or None
    header_attempt = headers.get(ATTEMPT_HEADER.lower()) or None
    step_key = headers.get(STEP_KEY_HEADER.lower()) or None
    candidates = [
        ("header", header_run, header_attempt),
        ("proxy-credentials", credentials.run, credentials.attempt),
        ("options", option_run or None, option_attempt or None),
        ("default", default_run, default_attempt),
    ]
    run_source, run = next((s, r) for s, r, _ in candidates if r)
    attempt_source, attempt = next((s, a) for s, _, a in candidates if a)
    return Identity(
        run=validate_id(run, "run id"),
        attempt=validate_id(attempt, "attempt id"),
        step_key=validate_id(step_key, "step key") if step_key else None,
        source=run_source,
        attempt_source=attempt_source,
    )


def split_control(fields: tuple[tuple[bytes, bytes], ...]) -> tuple[dict[str, str], tuple[tuple[bytes, bytes], ...]]:
    """One pass over raw header pairs: the sidecar's own headers (lower-case name -> value), and the
    pairs that may go upstream. `Durable-*` and Proxy-Authorization never reach the upstream."""
    control: dict[str, str] = {}
    kept = []
    for name, value in fields:
        lower = name.lower()
        if lower.startswith(b"durable-") or lower == b"proxy-authorization":
            control[lower.decode("latin-1")] = value.decode("latin-1")
        else:
            kept.append((name, value))
    return control, tuple(kept) if control else fields
