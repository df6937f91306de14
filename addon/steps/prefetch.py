"""Read-ahead for replay: the journaled answers an attempt is about to replay, fetched in batches.

A replay then costs no database round trip on the agent's path. Memory stays bounded whatever the
journal's size and however many attempts there are: at most WINDOW answers per attempt, none with a
body over MAX_BODY bytes (larger ones are read when their step is replayed), and all attempts'
answers together within one Budget (durable_read_ahead_bytes): past it, the answers of the
attempts used least recently are dropped first (read from the journal when their step comes).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from ..store.cursor import RunCursor
from ..store.journal import Journal, JournalError, StoredResponse

logger = logging.getLogger("durable")

WINDOW = 128  # answers read ahead per attempt: fetched 64 or more per statement
MAX_BODY = 64 * 1024


OVERHEAD = 512  # bytes an answer costs beyond its body (headers, objects), for the budget


def size(stored: StoredResponse) -> int:
    return len(stored.body) + OVERHEAD


class Budget:
    """Bytes of read-ahead answers held across every attempt, least recently used dropped first."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._held: OrderedDict[Prefetch, int] = OrderedDict()

    def touch(self, holder: Prefetch) -> None:
        if holder in self._held:
            self._held.move_to_end(holder)

    def add(self, holder: Prefetch, nbytes: int) -> None:
        self._held[holder] = self._held.get(holder, 0) + nbytes
        self._held.move_to_end(holder)
        self.used += nbytes
        while self.used > self.limit and self._held:
            victim, held = self._held.popitem(last=False)
            self.used -= held
            victim.ready.clear()

    def remove(self, holder: Prefetch, nbytes: int) -> None:
        if holder in self._held:
            self._held[holder] -= nbytes
            self.used -= nbytes

    def forget(self, holder: Prefetch) -> None:
        self.used -= self._held.pop(holder, 0)
        holder.ready.clear()


class Prefetch:
    def __init__(self, journal: Journal, run: str, cursor: RunCursor, budget: Budget) -> None:
        self.journal, self.run, self.cursor, self.budget = journal, run, cursor, budget
        self.ready: dict[int, StoredResponse] = {}
        self.fetched_to = 0  # the highest seq read ahead so far
        self._task: asyncio.Future[None] | None = None

    def take(self, seq: int) -> StoredResponse | None:
        """The answer of `seq` if it was read ahead; either way, keep the window full."""
        stored = self.ready.pop(seq, None)
        if stored is not None:
            self.budget.remove(self, size(stored))
            self.budget.touch(self)
        else:  # a miss: drop answers consumed another way, so they do not hold the window
            for stale in [s for s in self.ready if self.cursor.consumed(s)]:
                self.budget.remove(self, size(self.ready.pop(stale)))
        self.refill()
        return stored

    def refill(self) -> None:
        if (self._task is not None and not self._task.done()) or len(self.ready) > WINDOW // 2:
            return
        seqs = self.cursor.upcoming(max(self.fetched_to, self.cursor.high_water), WINDOW - len(self.ready))
        if seqs:
            self.fetched_to = seqs[-1]
            self._task = asyncio.ensure_future(self._fetch(seqs))

    async def _fetch(self, seqs: list[int]) -> None:
        try:
            fetched = await self.journal.responses(self.run, seqs, MAX_BODY)
            # meanwhile, some may have been answered another way
            fresh = {seq: stored for seq, stored in fetched.items() if not self.cursor.consumed(seq)}
            self.ready.update(fresh)
            self.budget.add(self, sum(size(stored) for stored in fresh.values()))
        except JournalError as e:  # replay falls back to reading each answer when it is needed
            logger.warning("durable: read-ahead of run %s failed: %s", self.run, e)
