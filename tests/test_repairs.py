"""What the sidecar holds for the journal while its link is broken (steps/repairs.py), as pure logic:
answers kept in bounded memory and committed once the journal answers, and steps recorded but never
sent handed back. The journal is a recorder that fails on demand; tests/test_connection_failures.py
breaks real links under a live sidecar."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from durable_sidecar.steps import repairs
from durable_sidecar.steps.inflight import InFlight
from durable_sidecar.steps.repairs import Held, Repairs
from durable_sidecar.store.journal import JournalError, NotOurs

SLOT = ("run", "v2:pay", 0)


class Journal:
    """Records give_back calls; raises the errors queued in `failures` first, one per call."""

    def __init__(self) -> None:
        self.given_back: list[tuple[str, str, int, int]] = []
        self.failures: list[Exception] = []

    async def give_back(self, run: str, key: str, occurrence: int, owner: int) -> None:
        if self.failures:
            raise self.failures.pop(0)
        self.given_back.append((run, key, occurrence, owner))


class Answer:
    """A held answer whose commit fails with each of `failures` in turn, then succeeds."""

    def __init__(self, size: int = 10, failures: tuple[Exception, ...] = ()) -> None:
        self.size = size
        self.failures = list(failures)
        self.commits = 0
        self.outcomes: list[bool] = []

    async def commit(self) -> None:
        self.commits += 1
        if self.failures:
            raise self.failures.pop(0)

    def held(self) -> Held:
        return Held(self.commit, self.size, self.outcomes.append)


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(repairs, "RETRY_S", 0.01)


def run(work: Callable[[Repairs, Journal, InFlight], Awaitable[None]]) -> tuple[Repairs, Journal]:
    journal, in_flight = Journal(), InFlight()
    kept = Repairs(journal, in_flight)  # type: ignore[arg-type]

    async def main() -> None:
        await work(kept, journal, in_flight)

    asyncio.run(main())
    return kept, journal


async def settle(kept: Repairs, timeout_s: float = 5.0) -> None:
    """Until the retry loop has nothing left to do."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while (kept.held or kept.unsent) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)


def test_held_answers_are_bounded_in_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(repairs, "HELD_MAX_BYTES", 100)
    down = (JournalError("down"),) * 1000
    a, b = Answer(60, down), Answer(40, down)

    async def work(kept: Repairs, journal: Journal, in_flight: InFlight) -> None:
        assert kept.hold(("run", "a", 0), a.held())
        assert kept.hold(("run", "b", 0), b.held())  # exactly at the bound: kept
        assert not kept.hold(("run", "c", 0), Answer(1).held())  # past it: refused, nothing kept
        assert set(kept.held) == {("run", "a", 0), ("run", "b", 0)} and kept.held_bytes == 100
        a.failures.clear()  # the journal answers again
        b.failures.clear()
        await settle(kept)
        assert kept.held == {} and kept.held_bytes == 0 and a.outcomes == b.outcomes == [True]

    run(work)


def test_a_held_answer_is_committed_once_the_journal_answers(caplog: pytest.LogCaptureFixture) -> None:
    answer = Answer(failures=(JournalError("down"), JournalError("still down")))

    async def work(kept: Repairs, journal: Journal, in_flight: InFlight) -> None:
        assert kept.hold(SLOT, answer.held())
        await settle(kept)

    kept, _ = run(work)
    assert answer.commits == 3 and answer.outcomes == [True]  # told once, journaled
    assert kept.held == {} and kept.held_bytes == 0
    assert "durable: run=run held answer journaled; the agent's retry is answered from it" in caplog.messages


def test_a_held_answer_for_a_step_no_longer_ours_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    answer = Answer(failures=(NotOurs("taken over"),))

    async def work(kept: Repairs, journal: Journal, in_flight: InFlight) -> None:
        kept.hold(SLOT, answer.held())
        await settle(kept)

    kept, _ = run(work)
    assert answer.commits == 1 and answer.outcomes == [False] and kept.held == {} and kept.held_bytes == 0
    assert "durable: run=run held answer dropped: taken over" in caplog.messages


def test_the_agents_retry_commits_the_held_answer_at_once_or_fails_while_the_journal_is_down() -> None:
    answer = Answer(failures=(JournalError("down"),))

    async def work(kept: Repairs, journal: Journal, in_flight: InFlight) -> None:
        await kept.commit_now(("run", "nothing held", 0))  # nothing held: nothing to do
        kept.hold(SLOT, answer.held())
        with pytest.raises(JournalError):
            await kept.commit_now(SLOT)
        assert SLOT in kept.held and answer.outcomes == []
        await kept.commit_now(SLOT)
        assert kept.held == {} and answer.outcomes == [True]

    run(work)
    assert answer.commits == 2


def test_a_superseded_hold_is_not_dropped_by_the_old_answers_commit() -> None:
    """A slot held twice keeps the second answer's bytes and fate, whatever the first one's commit does."""
    first, second = Answer(5), Answer(7, failures=(JournalError("down"),) * 1000)

    async def work(kept: Repairs, journal: Journal, in_flight: InFlight) -> None:
        kept.hold(SLOT, first.held())
        kept.hold(SLOT, second.held())
        await kept._commit(SLOT, first.held())
        assert kept.held[SLOT].size == 7 and first.outcomes == []
        second.failures.clear()
        await settle(kept)

    kept, _ = run(work)
    assert second.outcomes == [True] and kept.held == {}


def test_a_step_recorded_but_never_sent_is_handed_back_once_the_journal_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def work(kept: Repairs, journal: Journal, in_flight: InFlight) -> None:
        journal.failures = [JournalError("down")]
        kept.not_sent(SLOT, 42)
        assert kept.never_sent(SLOT)
        await settle(kept)
        assert kept.never_sent(SLOT)  # handed back: the sidecar's own retry still knows it never went
        kept.sent(SLOT)
        assert not kept.never_sent(SLOT)

    kept, journal = run(work)
    assert journal.given_back == [("run", "v2:pay", 0, 42)] and kept.unsent == {}
    assert (
        "durable: run=run a step whose pending commit went unanswered was never sent: handed back to be sent"
        " once by the next request for it"
    ) in caplog.messages


def test_a_step_being_sent_is_not_handed_back_meanwhile() -> None:
    async def work(kept: Repairs, journal: Journal, in_flight: InFlight) -> None:
        assert await in_flight.enter(SLOT, 0)  # the agent's retry is sending it
        kept.not_sent(SLOT, 42)
        await asyncio.sleep(0.1)
        assert journal.given_back == [] and SLOT in kept.unsent
        kept.sent(SLOT)  # it went
        in_flight.leave(SLOT)
        await asyncio.sleep(0.1)  # a few rounds of the retry loop
        assert journal.given_back == [] and not kept.never_sent(SLOT)

    run(work)


def test_steps_handed_back_are_remembered_up_to_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(repairs, "HANDED_KEPT", 2)
    slots = [("run", f"v2:{n}", 0) for n in range(3)]

    async def work(kept: Repairs, journal: Journal, in_flight: InFlight) -> None:
        for slot in slots:
            kept.not_sent(slot, 1)
            await settle(kept)
        assert list(kept.handed_back) == slots[1:]  # the oldest forgotten

    run(work)


def test_while_the_journal_is_down_a_round_tries_one_held_answer_not_all() -> None:
    """Each try of a down journal may take durable_db_timeout: a round stops at the first failure
    instead of spending one timeout per held answer, so the second answer is tried only once the
    first is in."""
    tries: list[str] = []
    first, second = Answer(failures=(JournalError("down"),) * 3), Answer()

    def logged(name: str, answer: Answer) -> Held:
        async def commit() -> None:
            tries.append(name)
            await answer.commit()

        return Held(commit, answer.size, answer.outcomes.append)

    async def work(kept: Repairs, journal: Journal, in_flight: InFlight) -> None:
        kept.hold(("run", "first", 0), logged("first", first))
        kept.hold(("run", "second", 0), logged("second", second))
        await settle(kept)

    run(work)
    assert tries == ["first"] * 4 + ["second"] and first.outcomes == second.outcomes == [True]


def test_while_the_journal_is_down_a_round_hands_back_no_further_step() -> None:
    a, b = ("run", "v2:a", 0), ("run", "v2:b", 0)

    async def work(kept: Repairs, journal: Journal, in_flight: InFlight) -> None:
        journal.failures = [JournalError("down")]
        kept.not_sent(a, 1)
        kept.not_sent(b, 1)
        await settle(kept)

    _, journal = run(work)
    assert journal.given_back == [("run", "v2:a", 0, 1), ("run", "v2:b", 0, 1)]  # b waited for a's round


def test_a_step_being_sent_does_not_hold_back_the_others() -> None:
    busy, other = ("run", "v2:busy", 0), ("run", "v2:other", 0)

    async def work(kept: Repairs, journal: Journal, in_flight: InFlight) -> None:
        assert await in_flight.enter(busy, 0)  # the agent's retry is sending it, for as long as it takes
        kept.not_sent(busy, 1)
        kept.not_sent(other, 1)
        await asyncio.sleep(0.1)
        assert journal.given_back == [("run", "v2:other", 0, 1)] and list(kept.unsent) == [busy]
        kept.sent(busy)
        in_flight.leave(busy)

    run(work)
