"""The replay cursor: which journaled step answers the next request of one attempt.

Key = (run, match key, occurrence). Within an attempt, the n-th request with match key K (its
fingerprint, or its explicit step key) is matched to the step journaled as occurrence n of K. This
survives parallel calls that arrive in another order after a restart (a position-only key does not)
and repeated identical calls (a content-only key does not). Pure in-memory logic; the journal loads
the index once per (run, attempt).

The index is compact, so a sidecar's memory stays flat however long the journal grows: no bodies,
no keys, only a 64-bit digest of (match key, occurrence) per step, kept sorted next to its seq, and
one byte of state per seq: about 17 bytes a step (100,000 steps: under 2 MB). It arrives while the
attempt is already being answered: the run's first steps by seq at once, a long run's whole index a
page at a time beside it (journal.load_index, lifecycle.py). A digest shared by
two steps is caught when the answer is read: the journal row names its own key (see `digest`).
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
from array import array
from collections.abc import Iterable
from dataclasses import dataclass

STATES = ("", "pending", "completed", "failed")  # by code; 0: no step has this seq
CODES = {name: code for code, name in enumerate(STATES) if name}
CONSUMED = 0x80  # flag on a state byte: this attempt has matched or journaled the step
STATE_MASK = 0x7F  # the STATES code in a state byte
COMPLETED = bytes([CODES["completed"]])  # an unconsumed completed step


def digest(key: str, occurrence: int) -> int:
    """The index's 64-bit name of (key, occurrence): the first 8 bytes of SHA-256, signed.

    The journal stores the same (durable_digest, migration 9), so the index arrives sorted.
    """
    return int.from_bytes(hashlib.sha256(f"{occurrence}:{key}".encode()).digest()[:8], "big", signed=True)


@dataclass(slots=True)
class StepRef:
    """What matching knows about one journaled step."""

    seq: int
    key: str
    occurrence: int
    state: str  # pending | completed | failed


@dataclass(frozen=True)
class Claim:
    key: str
    occurrence: int
    step: StepRef | None  # None: nothing journaled yet for this occurrence


class RunCursor:
    """Replay state of one attempt of one run."""

    def __init__(self) -> None:
        self._digests = array("q")  # sorted
        self._seqs = array("q")  # the seq of each digest
        self._states = bytearray(1)  # by seq: a STATES code, | CONSUMED once this attempt has it
        self.next_occurrence: dict[str, int] = {}
        self.returned: dict[str, list[int]] = {}  # occurrences given back (a heap per key), taken first
        self.high_water = 0  # highest seq this attempt has reached

    def load(self, rows: Iterable[tuple[int, int, str]]) -> None:
        """Add journaled steps as (digest, seq, state), cheapest in digest order (what the journal sends).

        A step this cursor already knows is skipped: its state here (found by a direct lookup,
        journaled or marked meanwhile) is newer than the journal's page."""
        states = self._states
        for d, seq, state in rows:
            if seq < len(states) and states[seq] & STATE_MASK:
                continue
            self._insert(d, seq)
            self._set(seq, CODES[state])

    def extend(self, rows: list[tuple[int, int, str]]) -> None:
        """Append steps in digest order to a cursor that knows none of them yet: the whole index as
        it streams in, a page at a time, at a fraction of `load`'s cost per step."""
        self._digests.extend([row[0] for row in rows])
        self._seqs.extend([row[1] for row in rows])
        states = self._states
        top = max(row[1] for row in rows) if rows else 0
        if top >= len(states):
            states.extend(bytes(top + 1 - len(states)))
        for _, seq, state in rows:
            states[seq] = CODES[state]

    def adopt(self, whole: RunCursor) -> None:
        """Take over the run's whole index, loaded beside this cursor while it served its head: the
        whole one's digests and states, except where this cursor knows newer (a state it found or
        was told, consumed or not by this attempt; a step journaled after the whole one was read)."""
        states = whole._states
        if len(states) < len(self._states):
            states.extend(bytes(len(self._states) - len(states)))
        for seq, code in enumerate(self._states):
            if code:
                states[seq] = code
        for d, seq in zip(self._digests, self._seqs, strict=True):
            if whole._find(d) is None:
                whole._insert(d, seq)
        self._digests, self._seqs, self._states = whole._digests, whole._seqs, states

    def _insert(self, d: int, seq: int) -> None:
        if self._digests and d < self._digests[-1]:
            i = bisect.bisect_left(self._digests, d)
            self._digests.insert(i, d)
            self._seqs.insert(i, seq)
        else:
            self._digests.append(d)
            self._seqs.append(seq)

    @property
    def max_seq(self) -> int:
        """Highest seq known in the run."""
        return len(self._states) - 1

    def claim(self, key: str) -> Claim:
        """Take the next occurrence of `key` (the lowest one given back first). Synchronous, so
        parallel identical calls get distinct ones."""
        returned = self.returned.get(key)
        if returned:
            occurrence = heapq.heappop(returned)
        else:
            occurrence = self.next_occurrence.get(key, 0)
            self.next_occurrence[key] = occurrence + 1
        return self.resolve(Claim(key, occurrence, None))

    def claim_occurrence(self, key: str, occurrence: int) -> Claim | None:
        """Take this occurrence of `key` (one chosen by its headers, choice.py) if this attempt has
        not: the ones it skips stay to be taken, lowest first. None when it is taken already."""
        returned = self.returned.setdefault(key, [])
        start = self.next_occurrence.get(key, 0)
        if occurrence in returned:
            returned.remove(occurrence)
            heapq.heapify(returned)
        elif occurrence >= start:
            for skipped in range(start, occurrence):
                heapq.heappush(returned, skipped)
            self.next_occurrence[key] = occurrence + 1
        else:
            return None
        return self.resolve(Claim(key, occurrence, None))

    def several(self, key: str, occurrence: int) -> bool:
        """Does the index hold another occurrence of `key` than this one (next to it, or before)?"""
        return any(
            self._find(digest(key, other)) is not None for other in (occurrence + 1, occurrence - 1) if other >= 0
        )

    def resolve(self, claim: Claim) -> Claim:
        """The claim with its journaled step, if the index holds one: a claim made while the index
        was still streaming in is resolved again once it is whole."""
        if claim.step is not None:
            return claim
        seq = self._find(digest(claim.key, claim.occurrence))
        if seq is None:
            return claim
        self._consume(seq)
        return Claim(claim.key, claim.occurrence, StepRef(seq, claim.key, claim.occurrence, self.state(seq)))

    def release(self, key: str, occurrence: int, seq: int | None) -> None:
        """Give back an occurrence whose answer the agent did not get (the sidecar answered an error,
        or the exchange broke off): the agent's retry in this attempt matches the same step again."""
        heapq.heappush(self.returned.setdefault(key, []), occurrence)
        if seq is not None and seq < len(self._states):
            self._states[seq] &= ~CONSUMED

    def add(self, step: StepRef) -> None:
        """A step this attempt just journaled (or found journaled by another)."""
        self.load([(digest(step.key, step.occurrence), step.seq, step.state)])
        self._consume(step.seq)

    def state(self, seq: int) -> str:
        return STATES[self._states[seq] & STATE_MASK] if seq < len(self._states) else ""

    def mark(self, seq: int, state: str) -> None:
        """A step's new state, once its answer (or failure) is journaled."""
        self._set(seq, CODES[state])

    def consumed(self, seq: int) -> bool:
        return seq < len(self._states) and bool(self._states[seq] & CONSUMED)

    def ahead(self, limit: int) -> tuple[list[int], int]:
        """Journaled steps past this attempt's furthest point that it has not consumed yet: the
        first `limit` seqs and how many there are.

        A request that matches nothing while such steps exist is a divergence. Steps behind the
        furthest point that were skipped (an earlier attempt's abandoned branch) do not count.
        """
        start = self.high_water + 1
        tail = self._states[start:]
        count = sum(tail.count(code) for code in CODES.values())  # unconsumed codes lack the flag
        seqs: list[int] = []
        for offset, code in enumerate(tail):
            if len(seqs) == min(limit, count):  # stop early: the tail may be a long run
                break
            if code and not code & CONSUMED:
                seqs.append(start + offset)
        return seqs, count

    def upcoming(self, after: int, limit: int) -> list[int]:
        """Seqs of completed steps after `after` this attempt has not consumed: what it will likely replay next."""
        found: list[int] = []
        seq = self._states.find(COMPLETED, after + 1)
        while seq != -1 and len(found) < limit:
            found.append(seq)
            seq = self._states.find(COMPLETED, seq + 1)
        return found

    def moved_past(self, seq: int) -> bool:
        """True when the run holds a step after `seq`: the run went on after that step."""
        return self.max_seq > seq

    def _find(self, d: int) -> int | None:
        i = bisect.bisect_left(self._digests, d)
        return self._seqs[i] if i < len(self._digests) and self._digests[i] == d else None

    def _set(self, seq: int, code: int) -> None:
        if seq >= len(self._states):
            self._states.extend(bytes(seq + 1 - len(self._states)))
        self._states[seq] = (self._states[seq] & CONSUMED) | code

    def _consume(self, seq: int) -> None:
        self._states[seq] |= CONSUMED
        self.high_water = max(self.high_water, seq)
