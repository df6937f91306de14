"""RFC 6901 JSON pointers, as far as the sidecar needs them: find the container holding a value."""

from __future__ import annotations

from typing import Any


def locate(doc: Any, pointer: str) -> tuple[Any, Any] | None:
    """(container, key or index) of the value `pointer` names in `doc`, or None when it is not there:
    a dict and its key, or a list and an index, so `container[key]` reads, sets and deletes it."""
    tokens = [t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:]]
    if not tokens:
        return None
    node: Any = doc
    container: Any = None
    key: Any = None
    for token in tokens:
        if isinstance(node, dict) and token in node:
            container, key, node = node, token, node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            container, key, node = node, int(token), node[int(token)]
        else:
            return None
    return container, key
