"""The replay cursor: which journaled step answers the next request of one attempt.

Key = (run, match key, occurrence). Within an attempt, the n-th request with match key K (its
fingerprint, or its explicit step key) is matched to the step journaled as occurrence n of K. This
survives parallel calls that arrive in another order after a restart (a position-only key does not)
and repeated identical calls (a content-only key does not). Pure in-memory logic; the journal loads
the index (no bodies) once per (run, attempt).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass(slots=True)
class StepRef:
    """What matching needs to know about one journaled step."""

    seq: int
    key: str
    occurrence: int
    state: str  # pending | completed | failed


@dataclass(frozen=True)
class Claim:
    key: str
    occurrence: int
    step: StepRef | None  # None: nothing journaled yet for this occurrence


@dataclass
class RunCursor:
    """Replay state of one attempt of one run."""

    steps: dict[tuple[str, int], StepRef] = field(default_factory=dict)
    seqs: list[int] = field(default_factory=list)  # every known seq, sorted
    by_seq: dict[int, StepRef] = field(default_factory=dict)
    next_occurrence: dict[str, int] = field(default_factory=dict)
    consumed: set[int] = field(default_factory=set)
    high_water: int = 0  # highest seq this attempt has reached
    max_seq: int = 0  # highest seq known in the run

    @classmethod
    def from_steps(cls, steps: list[StepRef]) -> "RunCursor":
        cursor = cls()
        for step in steps:
            cursor._index(step)
        return cursor

    def _index(self, step: StepRef) -> None:
        if step.seq not in self.by_seq:
            if not self.seqs or step.seq > self.seqs[-1]:
                self.seqs.append(step.seq)  # the usual case: steps arrive in seq order
            else:
                bisect.insort(self.seqs, step.seq)
        self.by_seq[step.seq] = step
        self.steps[(step.key, step.occurrence)] = step
        self.max_seq = max(self.max_seq, step.seq)

    def claim(self, key: str) -> Claim:
        """Take the next occurrence of `key`. Synchronous, so parallel identical calls get distinct ones."""
        occurrence = self.next_occurrence.get(key, 0)
        self.next_occurrence[key] = occurrence + 1
        step = self.steps.get((key, occurrence))
        if step is not None:
            self._consume(step.seq)
        return Claim(key, occurrence, step)

    def release(self, claim: Claim) -> None:
        """Give back a claim that was refused before anything was journaled (strict divergence)."""
        if claim.step is None and self.next_occurrence.get(claim.key) == claim.occurrence + 1:
            self.next_occurrence[claim.key] = claim.occurrence

    def add(self, step: StepRef) -> None:
        """A step this attempt just journaled."""
        self._index(step)
        self._consume(step.seq)

    def ahead(self) -> list[StepRef]:
        """Journaled steps past this attempt's furthest point that it has not consumed yet.

        A request that matches nothing while such steps exist is a divergence. Steps behind the
        furthest point that were skipped (an earlier attempt's abandoned branch) do not count.
        """
        start = bisect.bisect_right(self.seqs, self.high_water)
        return [self.by_seq[seq] for seq in self.seqs[start:] if seq not in self.consumed]

    def upcoming(self, after: int, limit: int) -> list[int]:
        """Seqs of completed steps after `after` this attempt has not consumed: what it will likely replay next."""
        found: list[int] = []
        for seq in self.seqs[bisect.bisect_right(self.seqs, after):]:
            if len(found) == limit:
                break
            if seq not in self.consumed and self.by_seq[seq].state == "completed":
                found.append(seq)
        return found

    def moved_past(self, seq: int) -> bool:
        """True when the run holds a step after `seq`: the run went on after that step."""
        return self.max_seq > seq

    def _consume(self, seq: int) -> None:
        self.consumed.add(seq)
        self.high_water = max(self.high_water, seq)
