"""What the sidecar knows that the journal does not yet: answers in hand whose commit failed, and
steps it recorded (maybe) but never sent.

An answer the upstream gave (and charged for) is never thrown away because the journal's link broke
at the wrong moment: it is held here, in memory bounded by HELD_MAX_BYTES, its commit retried every
RETRY_S until the journal answers, and the agent's retry of the step is answered from the journal
once it is in, never re-sent. Meanwhile the step stays in flight in this sidecar (its slot held, its
row naming this sidecar's live lease), so nobody else sends it either.

A pending commit whose reply was lost (the row may or may not exist) leaves a step that was never
forwarded. The sidecar knows that much: once the journal answers, the row is handed back (no owner,
approved for sending whatever the in-doubt policy), so the next attempt, here or on another sidecar,
sends it, once, instead of treating it as in doubt.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..store.journal import Journal, JournalError, NotOurs
from .inflight import InFlight, Slot

logger = logging.getLogger("durable")

HELD_MAX_BYTES = 64 * 1024 * 1024  # answers held across all steps; past it an answer is dropped (in doubt)
RETRY_S = 0.5
HANDED_KEPT = 10_000  # steps handed back, remembered so this sidecar's own retry is labelled recorded


@dataclass
class Held:
    commit: Callable[[], Awaitable[None]]  # the journal write that failed, as it was
    size: int
    settled: Callable[[bool], None]  # told once: True when the answer is journaled, False when it is dropped


class Repairs:
    def __init__(self, journal: Journal, in_flight: InFlight) -> None:
        self.journal = journal
        self.in_flight = in_flight  # a step is handed back only while no flow of this sidecar sends it
        self.held: dict[Slot, Held] = {}
        self.held_bytes = 0
        self.unsent: dict[Slot, int] = {}  # slot -> the lease id its row may name
        self.handed_back: OrderedDict[Slot, None] = OrderedDict()
        self._task: asyncio.Future[None] | None = None

    def hold(self, slot: Slot, held: Held) -> bool:
        """Keep an answer whose commit failed; False (and nothing kept) when over HELD_MAX_BYTES."""
        if self.held_bytes + held.size > HELD_MAX_BYTES:
            return False
        self.held[slot] = held
        self.held_bytes += held.size
        self._wake()
        return True

    def not_sent(self, slot: Slot, owner: int) -> None:
        self.unsent[slot] = owner
        self._wake()

    def never_sent(self, slot: Slot) -> bool:
        """This sidecar recorded the step (or may have: its pending commit went unanswered) and never sent it."""
        return slot in self.unsent or slot in self.handed_back

    def sent(self, slot: Slot) -> None:
        self.unsent.pop(slot, None)
        self.handed_back.pop(slot, None)

    async def commit_now(self, slot: Slot) -> None:
        """Commit the answer held for `slot` now (the agent asks for it again); raises JournalError
        while the journal cannot take it. Dropped instead if the step is another sidecar's now."""
        held = self.held.get(slot)
        if held is not None:
            await self._commit(slot, held)

    async def _commit(self, slot: Slot, held: Held) -> None:
        try:
            await held.commit()
        except NotOurs as e:
            logger.error("durable: run=%s held answer dropped: %s", slot[0], e)
            self._drop(slot, held, False)
            return
        self._drop(slot, held, True)
        logger.warning("durable: run=%s held answer journaled; the agent's retry is answered from it", slot[0])

    def _drop(self, slot: Slot, held: Held, journaled: bool) -> None:
        if self.held.get(slot) is held:
            del self.held[slot]
            self.held_bytes -= held.size
            held.settled(journaled)

    def _wake(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._retry())

    async def _retry(self) -> None:
        while self.held or self.unsent:
            await asyncio.sleep(RETRY_S)
            for slot, held in list(self.held.items()):
                try:
                    await self._commit(slot, held)
                except JournalError:
                    break  # still unreachable: try again later
            for slot, owner in list(self.unsent.items()):
                if not await self.in_flight.enter(slot, 0):
                    continue  # the agent's retry is sending it right now: nothing to hand back
                try:
                    if slot in self.unsent:
                        await self.journal.give_back(slot[0], slot[1], slot[2], owner)
                except JournalError:
                    break
                finally:
                    self.in_flight.leave(slot)
                self.unsent.pop(slot, None)
                self.handed_back[slot] = None
                while len(self.handed_back) > HANDED_KEPT:
                    self.handed_back.popitem(last=False)
                logger.warning(
                    "durable: run=%s a step whose pending commit went unanswered was never sent: handed back "
                    "to be sent once by the next request for it",
                    slot[0],
                )
