"""Each attempt's replay position: its cursor, filled from the run's index as it streams in, and
its read-ahead of the answers it replays first. At most durable_max_attempts are kept (the least
recently used is forgotten first), and an attempt idle past durable_attempt_idle is forgotten;
a forgotten attempt is refused, never matched from the start again."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from ..store.cursor import Claim, RunCursor
from ..store.journal import Journal
from .prefetch import Budget, Prefetch
from .responses import Refused

logger = logging.getLogger("durable")

FORGOTTEN_KEPT = 100_000  # forgotten attempts remembered (to refuse them), ~100 bytes each


@dataclass
class Position:
    """One attempt's replay position: its cursor, and the task streaming the run's index into it."""

    cursor: RunCursor
    index: asyncio.Future[None]
    choices: dict[str, dict[int, str | None]] = field(default_factory=dict)  # by key, read once per attempt


class Positions:
    def __init__(self, journal: Journal, read_ahead: Budget) -> None:
        self.journal = journal
        self.read_ahead = read_ahead
        self.cursors: dict[tuple[str, str], Position] = {}
        self.prefetches: dict[tuple[str, str], Prefetch] = {}
        self.last_used: OrderedDict[tuple[str, str], float] = OrderedDict()  # least recently used first
        self.forgotten: OrderedDict[tuple[str, str], None] = OrderedDict()  # attempts whose position is gone

    def get(self, run: str, attempt: str, max_attempts: int) -> Position:
        """The attempt's position; a new one starts streaming the run's index (no bodies) in.

        At most durable_max_attempts positions are kept: a new attempt past that makes the sidecar
        forget the one used least recently."""
        key = (run, attempt)
        if key in self.forgotten:
            raise Refused(
                409,
                "this attempt's replay position was forgotten (idle longer than durable_attempt_idle, or "
                "more than durable_max_attempts attempts since); its next calls cannot be matched safely: "
                "start the agent again with a new attempt id",
                run=run,
                attempt=attempt,
            )
        self.last_used[key] = time.monotonic()
        self.last_used.move_to_end(key)
        position = self.cursors.get(key)
        if position is None:
            while len(self.cursors) >= max_attempts:
                oldest = next(k for k in self.last_used if k != key)
                self._forget(oldest)
            cursor = RunCursor()
            position = self.cursors[key] = Position(cursor, self._load_index(key, cursor))
        elif position.index.done() and position.index.exception() is not None:
            position.index = self._load_index(key, position.cursor)  # into the same cursor: it skips what it has
        return position

    async def claim_while_loading(self, run: str, position: Position, claim: Claim) -> Claim:
        """The run's index is still streaming in. A completed step is answered at once, found in
        what has arrived or by one indexed lookup, so a resumed attempt's first answers do not wait
        for a long run's whole index; anything else (a new request, a step in doubt) waits for all
        of it, then is matched against it (a failed load fails this request; the next one retries it)."""
        if claim.step is None:
            found = await self.journal.find(run, claim.key, claim.occurrence)
            if found is not None and found.state == "completed":
                position.cursor.add(found)
                return Claim(claim.key, claim.occurrence, found)
        elif claim.step.state == "completed":
            return claim
        await asyncio.shield(position.index)
        return position.cursor.resolve(claim)

    async def prefer(self, run: str, position: Position, claim: Claim, choice: str | None) -> Claim:
        """Among the journaled steps of the claim's key, the first this attempt has not taken whose
        answer-choosing headers match the request's (matching/choice.py), when the claimed one's do
        not; when none does (credentials rotated), the claim as occurrence order made it."""
        cursor = position.cursor
        if claim.step is None:
            return claim
        if position.index.done() and not cursor.several(claim.key, claim.occurrence):
            return claim  # the common case, with no journal read: one step of this key (while the index
            # streams in, the cursor cannot tell, and the journal is asked)
        choices = position.choices.get(claim.key)
        if choices is None:
            choices = position.choices[claim.key] = await self.journal.choices(run, claim.key)
        if choices.get(claim.occurrence) == choice:
            return claim
        for occurrence in sorted(o for o, c in choices.items() if c == choice):
            chosen = cursor.claim_occurrence(claim.key, occurrence)
            if chosen is not None:
                cursor.release(claim.key, claim.occurrence, claim.step.seq)
                return chosen
        return claim

    def forget_idle(self, idle_s: float) -> int:
        """Drop the cursors of attempts unheard of for `idle_s`, so a long-lived sidecar's memory stays flat.

        An attempt that calls again after that is refused (409) rather than matched from the start
        again (it would be answered with its own earlier calls' answers), so the idle time must be
        far longer than any pause inside one life of an agent.
        """
        cutoff = time.monotonic() - idle_s
        stale = [key for key, used in self.last_used.items() if used < cutoff]
        for key in stale:
            self._forget(key)
        return len(stale)

    def _forget(self, key: tuple[str, str]) -> None:
        self.cursors.pop(key, None)
        prefetch = self.prefetches.pop(key, None)
        if prefetch is not None:
            self.read_ahead.forget(prefetch)
        self.last_used.pop(key, None)
        self.forgotten[key] = None
        while len(self.forgotten) > FORGOTTEN_KEPT:
            self.forgotten.popitem(last=False)

    def _load_index(self, key: tuple[str, str], cursor: RunCursor) -> asyncio.Future[None]:
        """Load the run's index into the attempt's cursor; read ahead once its head is in."""

        def read_ahead() -> None:  # once the run's head is in: what the attempt replays first
            position = self.cursors.get(key)
            if position is not None and position.cursor is cursor and key not in self.prefetches:
                prefetch = self.prefetches[key] = Prefetch(self.journal, key[0], cursor, self.read_ahead)
                prefetch.refill()

        def failed(task: asyncio.Future[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                logger.warning(
                    "durable: run=%s index not loaded (the next request retries): %s", key[0], task.exception()
                )

        task = asyncio.ensure_future(self.journal.load_index(key[0], cursor, read_ahead))
        task.add_done_callback(failed)
        return task
