"""Work on big bodies runs off the event loop, so one agent's 15 MiB request never stalls another
agent's replay.

Two kinds of work, two places. Parsing and canonicalising JSON (fingerprints, redaction, diffs) is
C code that holds the GIL for its whole run (json.loads of 15 MiB: ~200 ms), so a thread would not
free the loop: it goes to a worker process (spawned on first use, one per sidecar). Encryption
releases the GIL: a thread is enough. Work whose estimated cost stays under the threshold
(durable_offload_bytes, 1 MiB) stays inline, where the hop would cost more than the work; the cost
of a body is its bytes plus its structure (fingerprint.cost: a multipart part costs like a KiB), so
a small body of thousands of parts does not stall the loop either.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

DEFAULT_THRESHOLD = 1024 * 1024
_processes: ProcessPoolExecutor | None = None


def _pool() -> ProcessPoolExecutor:
    global _processes
    if _processes is None:  # spawned, not forked: the sidecar has threads (psycopg, metrics)
        _processes = ProcessPoolExecutor(
            max_workers=max(1, min(4, (os.cpu_count() or 2) - 1)),  # one big body never queues the rest
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_die_with,
            initargs=(os.getpid(),),
        )
    return _processes


def _die_with(parent: int) -> None:
    """In the worker: exit as soon as the sidecar is gone (SIGKILL included), never linger."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="durable-parent-watch").start()


async def run[T](size: int, threshold: int, work: Callable[..., T], *args: object) -> T:
    """`work(*args)` (work that releases the GIL) in a thread when `size` bytes are past `threshold`."""
    if threshold and size > threshold:
        return await asyncio.to_thread(work, *args)
    return work(*args)


async def run_cpu[T](size: int, threshold: int, work: Callable[..., T], *args: object) -> T:
    """`work(*args)` (a module-level function holding the GIL, picklable arguments) in the worker
    process when `size` bytes are past `threshold`; inline otherwise (0: always inline)."""
    if threshold and size > threshold:
        try:
            return await asyncio.get_running_loop().run_in_executor(_pool(), work, *args)
        except BrokenProcessPool:  # the worker died (killed, out of memory): a new one, once
            global _processes
            _processes = None
            return await asyncio.get_running_loop().run_in_executor(_pool(), work, *args)
    return work(*args)
