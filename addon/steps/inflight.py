"""Single flight inside one sidecar: at most one flow at a time sends a given step.

Keyed by (run, match key, occurrence), which is known before the step is journaled, so a flow that
is about to record a step and a flow of another attempt that found it pending cannot both send it.
Across sidecars the journal decides (the step's owner and its lease, see lease.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

Slot = tuple[str, str, int]  # (run, match key, occurrence)
GONE_POLL_S = 0.1


class InFlight:
    def __init__(self) -> None:
        self._slots: dict[Slot, asyncio.Future[None]] = {}

    def __len__(self) -> int:
        return len(self._slots)

    async def enter(self, slot: Slot, timeout_s: float, gone: Callable[[], bool] = lambda: False) -> bool:
        """Take `slot`, first waiting while another flow holds it; False if it is still held after
        `timeout_s`, or once `gone()` says the waiting agent hung up (looked at every GONE_POLL_S):
        its claim must go back before its retry claims the step, not when the holder is done."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (held := self._slots.get(slot)) is not None:
            remaining = deadline - loop.time()
            if remaining <= 0 or gone():
                return False
            try:
                await asyncio.wait_for(asyncio.shield(held), min(remaining, GONE_POLL_S))
            except TimeoutError:
                continue
        self._slots[slot] = loop.create_future()
        return True

    def leave(self, slot: Slot | None) -> None:
        """Let go of `slot` (idempotent), waking the flows waiting for it."""
        held = self._slots.pop(slot, None) if slot is not None else None
        if held is not None and not held.done():
            held.set_result(None)
