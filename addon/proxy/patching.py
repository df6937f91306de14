"""Replacing a piece of mitmproxy once: what httplayer.py and dispatch.py share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def wrap_once(owner: Any, name: str, make: Callable[[Any], Any]) -> bool:
    """Replace `owner.name` by `make(original)`, once (a second install keeps the first wrapper);
    False when this mitmproxy has no such attribute."""
    original = getattr(owner, name, None)
    if original is None:
        return False
    if not getattr(original, "durable_wrapped", False):
        wrapper = make(original)
        wrapper.durable_wrapped = True
        setattr(owner, name, wrapper)
    return True
