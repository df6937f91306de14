"""Replacing a piece of mitmproxy once: what httplayer.py, dispatch.py and the WebSocket modules share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def wrap_once(owner: Any, name: str, make: Callable[[Any], Any]) -> bool:
    """Replace `owner.name` by `make(original)`, once per `make` (a second install keeps the first
    wrapper; several modules may wrap the same method, each once); False when this mitmproxy has no
    such attribute."""
    original = getattr(owner, name, None)
    if original is None:
        return False
    done: frozenset[str] = getattr(original, "durable_wrappers", frozenset())
    tag = f"{make.__module__}.{make.__qualname__}"
    if tag not in done:
        wrapper = make(original)
        wrapper.durable_wrappers = done | {tag}
        setattr(owner, name, wrapper)
    return True
