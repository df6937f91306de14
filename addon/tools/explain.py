"""`durable explain`: the canonical envelope and fingerprint of a request, given the way people have it:
a curl command line (as copied from browser dev tools) or an entry of a HAR file."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..matching import fingerprint
from . import exchange

_DATA = {"-d", "--data", "--data-raw", "--data-binary", "--data-ascii"}
_IGNORED_FLAGS = {"--compressed", "-s", "--silent", "-k", "--insecure", "-L", "--location", "-i", "-v", "-G"}


def parse_curl(argv: list[str]) -> fingerprint.RequestParts:
    """A curl command line (words, or one string) -> RequestParts. Raises ValueError on what it cannot read."""
    words = shlex.split(argv[0]) if len(argv) == 1 else list(argv)
    if words and words[0] == "curl":
        words = words[1:]
    method, url, headers, data = None, None, [], []
    it = iter(words)
    for word in it:
        if word in ("-X", "--request"):
            method = next(it)
        elif word in ("-H", "--header"):
            name, _, value = next(it).partition(":")
            headers.append((name.strip(), value.strip()))
        elif word in _DATA or word == "--json":
            value = next(it)
            data.append(Path(value[1:]).read_text() if value.startswith("@") else value)
            if word == "--json":
                headers += [("Content-Type", "application/json"), ("Accept", "application/json")]
        elif word in _IGNORED_FLAGS:
            continue
        elif word.startswith("-"):
            raise ValueError(f"curl option {word} is not understood by explain")
        else:
            url = word
    if url is None:
        raise ValueError("no URL in the curl command line")
    split = urlsplit(url)
    if split.scheme not in ("http", "https") or not split.hostname:
        raise ValueError(f"not an http(s) URL: {url}")
    body = "&".join(data).encode()
    if body and not any(k.lower() == "content-type" for k, _ in headers):
        headers.append(("Content-Type", "application/x-www-form-urlencoded"))
    return fingerprint.RequestParts(
        method=(method or ("POST" if data else "GET")).upper(),
        scheme=split.scheme,
        host=split.hostname,
        port=split.port or (443 if split.scheme == "https" else 80),
        path=(split.path or "/") + (f"?{split.query}" if split.query else ""),
        headers=headers,
        body=body,
    )


def from_har(path: Path, entry: int) -> fingerprint.RequestParts:
    """Entry `entry` of a HAR or flow file, counting from 1 (as seq and Durable-Step do)."""
    flows = exchange.read(path)
    if not 1 <= entry <= len(flows):
        raise ValueError(f"{path} has entries 1..{len(flows)} (with a response); no entry {entry}")
    return fingerprint.request_parts(flows[entry - 1].request)


def explain(parts: fingerprint.RequestParts) -> dict[str, Any]:
    env = fingerprint.envelope(parts)
    return {"fingerprint": f"v{fingerprint.VERSION}:{fingerprint.fingerprint(env)}", "envelope": env}
