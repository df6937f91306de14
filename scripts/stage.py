"""A scratch stage for the scripts that measure the sidecar: a database of their own on a server
that may create one, a work folder, the paid API; all removed at the end. And the one reading of
a process's memory from /proc they share."""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import paid_api  # noqa: E402

from durable_sidecar.store import database


@dataclass(frozen=True)
class Stage:
    admin: str  # may create and drop databases
    dsn: str  # this stage's own database
    work: Path
    api: str  # the paid API's base URL


@contextmanager
def stage(dsn_option: str | None, name: str, tls: bool = False) -> Iterator[Stage]:
    admin = database.resolve(dsn_option).dsn
    dsn = database.create_database(admin, f"durable_{name}")
    try:
        with tempfile.TemporaryDirectory(prefix=f"durable-{name}-") as tmp:
            work = Path(tmp)
            api, port = paid_api.spawn(work, tls=tls)
            try:
                yield Stage(admin, dsn, work, f"{'https' if tls else 'http'}://127.0.0.1:{port}")
            finally:
                api.kill()
                api.wait()
    finally:
        database.drop_database(admin, dsn)


def run_for(threads: list[threading.Thread], seconds: float, stop: threading.Event) -> None:
    """Start the threads, let them work for `seconds`, then set `stop` and wait for them all."""
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()


def status_kib(pid: int, field: str) -> int:
    """A field of /proc/PID/status in KiB (VmRSS, VmHWM: the peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)
