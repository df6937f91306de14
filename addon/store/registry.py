"""The durable-sidecar services running on this host, by port: a sidecar never journals a call to
one of them (an agent after `durable env`, which unsets NO_PROXY, may curl the UI through it).

`durable ui` names its port in $DURABLE_HOME/services/ui-PORT (holding its pid) while it serves; a
sidecar reads the folder at most once a second and keeps the ports whose process is alive.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from . import database

FRESH_S = 1.0  # how long a sidecar trusts its last look at the folder


def folder() -> Path:
    return database.durable_home() / "services"


@contextlib.contextmanager
def serving(name: str, port: int) -> Iterator[None]:
    """Name this process's port while the block runs."""
    entry = folder() / f"{name}-{port}"
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.write_text(str(os.getpid()))
    try:
        yield
    finally:
        entry.unlink(missing_ok=True)


class Ports:
    """The ports of the services alive now, looked at most once every FRESH_S."""

    def __init__(self) -> None:
        self._ports: frozenset[int] = frozenset()
        self._seen = 0.0

    def now(self) -> frozenset[int]:
        if time.monotonic() - self._seen >= FRESH_S:
            self._seen = time.monotonic()
            self._ports = frozenset(_alive())
        return self._ports


def _alive() -> Iterator[int]:
    try:
        entries = list(folder().iterdir())
    except OSError:
        return
    for entry in entries:
        try:
            pid, port = int(entry.read_text()), int(entry.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            continue
        yield port
