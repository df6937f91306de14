"""Read-ahead for replay: the journaled answers an attempt is about to replay, fetched in batches.

A replay then costs no database round trip on the agent's path. Memory stays bounded whatever the
journal's size: at most WINDOW answers per attempt, none with a body over MAX_BODY bytes (larger
ones are read when their step is replayed).
"""

from __future__ import annotations

import asyncio
import logging

from .cursor import RunCursor
from .journal import Journal, JournalError, StoredResponse

logger = logging.getLogger("durable")

WINDOW = 32
MAX_BODY = 64 * 1024


class Prefetch:
    def __init__(self, journal: Journal, run: str, cursor: RunCursor) -> None:
        self.journal, self.run, self.cursor = journal, run, cursor
        self.ready: dict[int, StoredResponse] = {}
        self.fetched_to = 0  # the highest seq read ahead so far
        self._task: asyncio.Future[None] | None = None

    def take(self, seq: int) -> StoredResponse | None:
        """The answer of `seq` if it was read ahead; either way, keep the window full."""
        stored = self.ready.pop(seq, None)
        if stored is None:  # a miss: drop answers consumed another way, so they do not hold the window
            for stale in [s for s in self.ready if self.cursor.consumed(s)]:
                del self.ready[stale]
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
            self.ready.update((seq, stored) for seq, stored in fetched.items() if not self.cursor.consumed(seq))
        except JournalError as e:  # replay falls back to reading each answer when it is needed
            logger.warning("durable: read-ahead of run %s failed: %s", self.run, e)
