"""Field-level differences between a request and a journaled one, to explain a divergence.

Reported as a list of {field, journaled, now}; JSON bodies are compared by JSON pointer, so a
changed timestamp in a prompt shows up as `/messages/0/content` rather than "body differs".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

_MISSING = "<absent>"
LIMIT = 20


def _json(body: bytes | None) -> Any:
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None


def _walk(pointer: str, old: Any, new: Any, out: list[dict[str, Any]]) -> None:
    if len(out) >= LIMIT or old == new:
        return
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            child = f"{pointer}/{str(key).replace('~', '~0').replace('/', '~1')}"
            _walk(child, old.get(key, _MISSING), new.get(key, _MISSING), out)
    elif isinstance(old, list) and isinstance(new, list):
        for i in range(max(len(old), len(new))):
            _walk(
                f"{pointer}/{i}",
                old[i] if i < len(old) else _MISSING,
                new[i] if i < len(new) else _MISSING,
                out,
            )
    else:
        out.append({"field": f"body{pointer}", "journaled": old, "now": new})


def diff(
    journaled_env: dict[str, Any],
    journaled_body: bytes | None,
    env: dict[str, Any],
    body: bytes | None,
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name in ("method", "scheme", "host", "port", "path"):
        if journaled_env.get(name) != env.get(name):
            out.append({"field": name, "journaled": journaled_env.get(name), "now": env.get(name)})
    old_query, new_query = dict(map(tuple, journaled_env.get("query", []))), dict(map(tuple, env.get("query", [])))
    for key in sorted(set(old_query) | set(new_query)):
        if old_query.get(key) != new_query.get(key):
            out.append(
                {
                    "field": f"query.{key}",
                    "journaled": old_query.get(key, _MISSING),
                    "now": new_query.get(key, _MISSING),
                }
            )
    if journaled_env.get("headers") != env.get("headers"):
        out.append({"field": "headers", "journaled": journaled_env.get("headers"), "now": env.get("headers")})
    if journaled_env.get("body") != env.get("body"):
        old_doc, new_doc = _json(journaled_body), _json(body)
        if old_doc is not None and new_doc is not None:
            _walk("", old_doc, new_doc, out)
        else:
            out.append({"field": "body", "journaled": journaled_env.get("body"), "now": env.get("body")})
    return out[:LIMIT]


def nearest(
    candidates: list[dict[str, Any]], env: dict[str, Any], body: bytes | None
) -> tuple[int, list[dict[str, Any]]] | None:
    """The journaled request (rows with seq, envelope, request_body) closest to this one, and the diff."""
    best: tuple[int, list[dict[str, Any]]] | None = None
    for row in candidates:
        d = diff(row["envelope"], bytes(row["request_body"] or b""), env, body)
        if best is None or len(d) < len(best[1]):
            best = (row["seq"], d)
    return best


def hashed(out: list[dict[str, Any]], digest: Callable[[bytes], str]) -> list[dict[str, Any]]:
    """The diff as it may be logged: field paths, and a keyed hash of each value, never the value."""
    return [
        {
            "field": d["field"],
            "journaled": digest(json.dumps(d["journaled"], default=str).encode()),
            "now": digest(json.dumps(d["now"], default=str).encode()),
        }
        for d in out
    ]
