"""The replay cursor (pure logic)."""

from __future__ import annotations

import hashlib

import pytest

from durable_sidecar.store.cursor import RunCursor, StepRef, digest


def journal(*keys: str) -> RunCursor:
    occurrences: dict[str, int] = {}
    steps = []
    for seq, key in enumerate(keys, start=1):
        occ = occurrences.get(key, 0)
        occurrences[key] = occ + 1
        steps.append(StepRef(seq, key, occ, "completed"))
    return indexed(steps)


def indexed(steps) -> RunCursor:
    cursor = RunCursor()
    cursor.load((digest(s.key, s.occurrence), s.seq, s.state) for s in steps)
    return cursor


def test_adopting_the_whole_index_keeps_what_the_cursor_learnt_while_it_loaded() -> None:
    """While a long run's whole index loads, the cursor serves its head, is told new states and
    learns of steps journaled after the whole index was read; adopting the whole keeps all of that."""
    steps = [StepRef(seq, f"k{seq}", 0, "pending" if seq == 3 else "completed") for seq in range(1, 9)]
    live = indexed(steps[:2])  # the head
    assert live.claim("k1").step.seq == 1  # replayed from the head: consumed
    live.add(StepRef(9, "late", 0, "pending"))  # journaled after the whole index's snapshot
    live.mark(9, "completed")
    live.load([(digest("k3", 0), 3, "pending")])
    live.mark(3, "completed")  # answered meanwhile: newer than the whole index's "pending"
    live.adopt(indexed(steps))
    assert live.consumed(1) and live.claim("k1").step is None  # its occurrence 1 is new: nothing journaled
    assert live.state(3) == "completed" and live.state(9) == "completed" and not live.consumed(3)
    assert [live.claim(k).step.seq for k in ("k8", "k3", "late", "k2")] == [8, 3, 9, 2]
    assert live.upcoming(0, 10) == [4, 5, 6, 7]
    assert live.max_seq == 9 and not live.moved_past(9)  # the run ends where it ends, adopted or not


def test_repeated_identical_calls_match_in_journal_order() -> None:
    cursor = journal("A", "A", "A")
    assert [cursor.claim("A").step.seq for _ in range(3)] == [1, 2, 3]
    fourth = cursor.claim("A")
    assert fourth.step is None and fourth.occurrence == 3


def test_parallel_calls_arriving_in_another_order_match_their_own_steps() -> None:
    cursor = journal("A", "B", "C")
    assert [cursor.claim(k).step.seq for k in ("C", "A", "B")] == [3, 1, 2]
    assert cursor.ahead(20) == ([], 0)


def test_divergence_means_unconsumed_steps_ahead() -> None:
    cursor = journal("A", "B", "C")
    cursor.claim("A")
    miss = cursor.claim("X")
    assert miss.step is None
    assert cursor.ahead(20) == ([2, 3], 2) and cursor.ahead(1) == ([2], 2)


def test_skipped_branch_behind_the_cursor_is_not_a_divergence() -> None:
    # attempt 1 recorded A B; attempt 2 diverged at B with B' (seq 3) and went on with C (seq 4)
    cursor = journal("A", "B", "B'", "C")
    for key in ("A", "B'", "C"):
        assert cursor.claim(key).step is not None
    assert cursor.claim("D").step is None
    assert cursor.ahead(20) == ([], 0)  # B (seq 2) lies behind the furthest point reached
    right_behind = journal("A", "B", "C")  # B skipped just behind the furthest point, C
    assert right_behind.claim("A").step and right_behind.claim("C").step and right_behind.ahead(20) == ([], 0)


def test_new_steps_are_consumed_and_extend_the_run() -> None:
    cursor = journal("A")
    cursor.claim("A")
    claim = cursor.claim("B")
    cursor.add(StepRef(2, "B", claim.occurrence, "pending"))
    assert cursor.ahead(20) == ([], 0) and cursor.max_seq == 2 and cursor.moved_past(1) and not cursor.moved_past(2)


def test_release_gives_back_a_refused_claim() -> None:
    cursor = journal("A")
    claim = cursor.claim("X")
    cursor.release(claim.key, claim.occurrence, None)
    assert cursor.claim("X").occurrence == 0


def test_a_released_step_is_matched_again_before_later_occurrences() -> None:
    """The sidecar answered an error for the 1st of 3 identical calls: the agent's retry is that step, not a 4th."""
    cursor = journal("P", "P", "P")
    first, second = cursor.claim("P"), cursor.claim("P")
    cursor.release(first.key, first.occurrence, first.step.seq)
    assert not cursor.consumed(1) and cursor.consumed(2)
    retry = cursor.claim("P")
    assert (retry.occurrence, retry.step.seq) == (0, 1) and cursor.consumed(1)
    assert cursor.claim("P").step.seq == 3 and second.step.seq == 2


def test_explicit_keys_and_fingerprints_are_separate_spaces() -> None:
    cursor = journal("key:pay-1", "v1:abc")
    assert cursor.claim("v1:abc").step.seq == 2
    assert cursor.claim("key:pay-1").step.seq == 1


def test_idle_attempts_are_forgotten(mocker) -> None:
    from collections import OrderedDict

    from durable_sidecar.steps.lifecycle import Lifecycle
    from durable_sidecar.steps.responses import Refused

    lifecycle = Lifecycle(mocker.Mock(), mocker.Mock(read_ahead_bytes=1024), mocker.Mock())
    clock = mocker.patch("durable_sidecar.steps.lifecycle.time.monotonic", return_value=1000.0)
    lifecycle.positions.last_used = OrderedDict({("r", "old"): 0.0, ("r", "new"): 990.0})
    lifecycle.positions.cursors = {("r", "old"): mocker.Mock(), ("r", "new"): mocker.Mock()}
    assert lifecycle.positions.forget_idle(idle_s=100) == 1
    assert set(lifecycle.positions.cursors) == {("r", "new")} and set(lifecycle.positions.last_used) == {("r", "new")}
    clock.return_value = 2000.0
    assert lifecycle.positions.forget_idle(idle_s=100) == 1 and not lifecycle.positions.cursors
    with pytest.raises(Refused) as refused:  # never matched from the start again: its own answers would come back
        lifecycle.positions.get("r", "old", 10)
    assert refused.value.status == 409 and "new attempt" in refused.value.reason


def test_states_follow_the_journal_and_consumption() -> None:
    cursor = journal("A", "B", "C")
    assert cursor.upcoming(0, 10) == [1, 2, 3]
    step = cursor.claim("B").step
    assert step.state == "completed" and cursor.consumed(2) and not cursor.consumed(1)
    assert cursor.upcoming(0, 10) == [1, 3]
    cursor.mark(2, "pending")
    assert cursor.state(2) == "pending" and cursor.consumed(2)  # marking keeps the consumed flag
    assert cursor.upcoming(0, 1) == [1]


def test_the_index_holds_digests_not_keys() -> None:
    # out of digest order (load sorts), a long explicit key, and a non-ASCII one
    keys = [f"key:{'x' * 500}-{n}" for n in range(200)] + ["key:paiement-é"]
    cursor = indexed(StepRef(seq, key, 0, "completed") for seq, key in enumerate(reversed(keys), start=1))
    assert list(cursor._digests) == sorted(cursor._digests)
    assert cursor._digests.itemsize == 8 and len(cursor._digests) == len(keys)
    assert cursor.claim("key:paiement-é").step.seq == 1
    assert cursor.claim(keys[0]).step.seq == len(keys)
    assert cursor.claim("key:unknown").step is None


def test_a_digest_is_stable_and_names_key_and_occurrence() -> None:
    # the journal's SQL computes the same value (tests/test_journal_statements.py checks it against PostgreSQL)
    assert digest("v1:abc", 0) == int.from_bytes(hashlib.sha256(b"0:v1:abc").digest()[:8], "big", signed=True)
    assert digest("v1:abc", 0) != digest("v1:abc", 1) != digest("v1:abd", 1)


def test_a_one_step_run_has_its_step_ahead_of_a_new_attempt() -> None:
    """The first request of a new attempt that matches nothing diverges from the run's step 1
    (under durable_strict, a 409): a new attempt starts before seq 1, not at it."""
    assert journal("a").ahead(10) == ([1], 1)


def test_loading_again_skips_what_is_known_and_keeps_the_rest() -> None:
    """An index loaded again into the same cursor (after a failed load) skips the steps it has,
    one by one, and still learns every step after them."""
    cursor = journal("a")
    cursor.load(sorted([(digest("a", 0), 1, "completed"), (digest("b", 0), 2, "completed"),
                        (digest("c", 0), 3, "completed")]))
    assert [cursor.claim(k).step.seq for k in ("a", "b", "c")] == [1, 2, 3]


def test_an_index_streamed_in_pages_knows_where_the_run_ends() -> None:
    """`extend` (a long run's whole index, a page at a time) makes the cursor's last seq the run's
    last: a failed step at the tail is re-sent, not taken for one the run moved past."""
    cursor = RunCursor()
    cursor.extend(sorted([(digest("a", 0), 1, "completed"), (digest("b", 0), 2, "failed")]))
    assert cursor.max_seq == 2 and not cursor.moved_past(2) and cursor.moved_past(1)
    assert cursor.state(2) == "failed"


def test_a_failed_step_at_the_tail_is_not_one_the_run_moved_past() -> None:
    """A run whose last step failed ends there: that step is re-sent, not replayed as a failure the
    agent already handled."""
    cursor = indexed([StepRef(1, "a", 0, "failed")])
    assert cursor.max_seq == 1 and not cursor.moved_past(1)


def test_an_occurrence_chosen_by_its_headers_leaves_the_skipped_ones_to_be_taken_lowest_first() -> None:
    cursor = journal("k", "k", "k", "k")
    assert cursor.several("k", 0) and cursor.several("k", 3) and not journal("k").several("k", 0)
    chosen = cursor.claim_occurrence("k", 2)
    assert chosen is not None and (chosen.occurrence, chosen.step.seq) == (2, 3) and cursor.consumed(3)
    assert cursor.claim_occurrence("k", 2) is None  # taken already
    assert [cursor.claim("k").occurrence for _ in range(3)] == [0, 1, 3]
    cursor.release("k", 1, 2)
    again = cursor.claim_occurrence("k", 1)  # a given-back one can be chosen too
    assert again is not None and again.step.seq == 2 and cursor.claim("k").occurrence == 4
