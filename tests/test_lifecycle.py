"""The step life cycle (DESIGN.md section 3) through the addon's hooks, in process: mitmproxy's test
flows stand for the agent and the upstream, the journal is a real PostgreSQL. What each hook leaves
in the journal and hands the agent, for every path a step can take: recorded, replayed, failed and
re-sent, broken off before or after it left, in doubt, diverged, waited for in single flight. The
same paths run end to end (real mitmdump, real clients) in test_exactly_once.py, test_crash_resume.py
and test_agent_failures.py; here they take a second, so scripts/mutate.sh runs these first."""

from __future__ import annotations

import asyncio
import gzip
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import sql
from inprocess import STEPS, answer, break_off, call, new_run, refusal, send, sidecar, stream
from mitmproxy import flow as mflow
from mitmproxy import http
from mitmproxy.test import tutils

from durable_sidecar.proxy import httplayer
from durable_sidecar.proxy.sidecar import META
from durable_sidecar.steps import repairs
from durable_sidecar.store.journal import JournalError


async def journal_down(*args: Any, **kwargs: Any) -> None:
    """A journal statement that fails as one does when the link to PostgreSQL is lost."""
    raise JournalError("connection lost")


def test_a_call_is_journaled_before_it_leaves_and_replayed_byte_identical(pg_dsn: str) -> None:
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            first = call(run, "a1")
            assert await send(addon, first) == "recorded"
            assert first.response is None  # free to go upstream, and only now
            ((seq, state, status, key),) = sql(pg_dsn, STEPS, run)
            assert (seq, state, status) == (1, "pending", None) and key
            assert first.request.headers["Idempotency-Key"] == key  # minted for a POST, sent with it
            assert "Durable-Run-Id" not in first.request.headers and "Durable-Attempt" not in first.request.headers
            await answer(addon, first, body=b'{"charged": 5, "id": "ch_1"}')
            assert sql(pg_dsn, STEPS, run) == [(1, "completed", 200, key)]
            assert first.response.headers["Durable-Outcome"] == "recorded"

            again = call(run, "a2")
            assert await send(addon, again) == "replayed"
            assert again.response is not None and not again.metadata[META].live
            assert again.response.status_code == 200 and again.response.content == b'{"charged": 5, "id": "ch_1"}'
            assert again.response.headers["x-upstream"] == "yes"
            assert again.metadata[META].seq == 1
            await addon.response(again)
            assert again.response.headers["Durable-Outcome"] == "replayed"
        assert sql(pg_dsn, STEPS, run) == [(1, "completed", 200, key)]

    asyncio.run(scenario())


def test_the_same_call_twice_in_an_attempt_is_two_steps_replayed_in_order(pg_dsn: str) -> None:
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            for n in (1, 2):
                flow = call(run, "a1")
                assert await send(addon, flow) == "recorded"
                await answer(addon, flow, body=f"answer {n}".encode())
            replies = []
            for _ in (1, 2):
                flow = call(run, "a2")
                assert await send(addon, flow) == "replayed"
                replies.append(flow.response.content)
            assert replies == [b"answer 1", b"answer 2"]
            third = call(run, "a2")  # the new attempt goes further than the first: a new step
            assert await send(addon, third) == "recorded" and third.metadata[META].seq == 3
            await answer(addon, third)
        keys = [key for *_, key in sql(pg_dsn, STEPS, run)]
        assert len(set(keys)) == 3

    asyncio.run(scenario())


def test_the_agents_own_idempotency_key_is_kept_and_a_get_gets_none(pg_dsn: str) -> None:
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            own = call(run, "a1", Idempotency_Key="agent-key-1")
            await send(addon, own)
            assert own.request.headers["Idempotency-Key"] == "agent-key-1"
            await answer(addon, own)
            read = call(run, "a1", body=b"", method="GET")
            await send(addon, read)
            assert "Idempotency-Key" not in read.request.headers
            await answer(addon, read)
        assert sql(pg_dsn, STEPS, run) == [(1, "completed", 200, "agent-key-1"), (2, "completed", 200, None)]

    asyncio.run(scenario())


def test_a_transient_answer_is_journaled_failed_and_re_sent_with_its_key(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A failure at the tail of the run: the next attempt sends the step again, with its key."""
    caplog.set_level(logging.INFO, "durable")
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            first = call(run, "a1")
            await send(addon, first)
            key = first.request.headers["Idempotency-Key"]
            await answer(addon, first, status=503, body=b"overloaded")
            assert first.response.status_code == 503  # the agent sees the upstream's answer
            assert sql(pg_dsn, STEPS, run) == [(1, "failed", 503, key)]

            retry = call(run, "a2")  # the agent crashed on it and starts again
            assert await send(addon, retry) == "reissued"
            assert retry.metadata[META].seq == 1 and retry.request.headers["Idempotency-Key"] == key
            resent = [r.getMessage() for r in caplog.records if "re-sent with its original" in r.getMessage()]
            assert re.fullmatch(rf"durable: run={run} seq=1 failed, \d+s ago: re-sent with its original idempotency key", resent[0])
            await answer(addon, retry, body=b"charged once")
            assert sql(pg_dsn, STEPS, run) == [(1, "completed", 200, key)]

            later = call(run, "a3")
            assert await send(addon, later) == "replayed" and later.response.content == b"charged once"

    asyncio.run(scenario())


def test_a_failure_the_run_moved_past_is_replayed_as_it_was(pg_dsn: str) -> None:
    """The agent handled that failure and went on: a new attempt gets the same failure, so it takes
    the same path, rather than a fresh try that would change the run."""
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            failing = call(run, "a1", body=b'{"q": "search"}')
            await send(addon, failing)
            await answer(addon, failing, status=429, body=b"slow down")
            refused = call(run, "a1", body=b'{"q": "search"}')
            await send(addon, refused)
            await break_off(addon, refused, connected=False)  # never reached the upstream: failed
            after = call(run, "a1")
            await send(addon, after)
            await answer(addon, after)
            assert [state for _, state, *_ in sql(pg_dsn, STEPS, run)] == ["failed", "failed", "completed"]

            replays = [
                call(run, "a2", body=b'{"q": "search"}'),
                call(run, "a2", body=b'{"q": "search"}'),
                call(run, "a2"),
            ]
            for flow in replays:
                assert await send(addon, flow) == "replayed"
            assert (replays[0].response.status_code, replays[0].response.content) == (429, b"slow down")
            status, body = refusal(replays[1])
            assert status == 502 and body["reason"] == "journaled upstream failure, replayed"
            assert "connection reset by peer" in body["failed"]
            assert replays[2].response.status_code == 200

    asyncio.run(scenario())


def test_a_call_that_never_left_is_failed_and_sent_again_at_the_tail(pg_dsn: str) -> None:
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            for tls_failed in (False, True):
                flow = call(run, "a1", body=f'{{"tls": {str(tls_failed).lower()}}}'.encode())
                await send(addon, flow)
                # no TCP connection at all, or one whose TLS handshake never finished
                await break_off(addon, flow, connected=tls_failed, tls_done=False)
            rows = sql(pg_dsn, "SELECT seq, state, error FROM durable_steps WHERE run_id = %s ORDER BY seq", run)
            assert rows == [(1, "failed", "connection reset by peer"), (2, "failed", "connection reset by peer")]
            moved_past = call(run, "a2", body=b'{"tls": false}')
            assert await send(addon, moved_past) == "replayed" and refusal(moved_past)[0] == 502
            at_the_tail = call(run, "a2", body=b'{"tls": true}')
            assert await send(addon, at_the_tail) == "reissued" and at_the_tail.metadata[META].seq == 2

    asyncio.run(scenario())


def test_a_call_broken_after_it_left_is_in_doubt_and_its_retry_re_sends_it_with_its_key(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 28, bug 1: the step goes back to the attempt, so the SDK's retry in the same attempt is
    the same step with the same idempotency key (the upstream deduplicates), not a second charge."""
    caplog.set_level(logging.INFO, "durable")
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            first = call(run, "a1")
            await send(addon, first)
            key = first.request.headers["Idempotency-Key"]
            await break_off(addon, first, connected=True)
            assert sql(pg_dsn, STEPS, run) == [(1, "pending", None, key)]
            expected = f"durable: run={run} seq=1 in doubt: connection reset by peer after the request may have reached the upstream"
            assert [r.getMessage() for r in caplog.records if r.name == "durable" and "in doubt" in r.getMessage()] == [expected]
            retry = call(run, "a1")
            assert await send(addon, retry) == "reissued"
            assert retry.metadata[META].seq == 1 and retry.request.headers["Idempotency-Key"] == key
            resent = [r.getMessage() for r in caplog.records if "re-sent with its original" in r.getMessage()]
            assert re.fullmatch(rf"durable: run={run} seq=1 in doubt since \d+s ago: re-sent with its original idempotency key", resent[0])
            await answer(addon, retry)
            assert sql(pg_dsn, STEPS, run) == [(1, "completed", 200, key)]

    asyncio.run(scenario())


def test_an_answer_cut_short_leaves_the_step_in_doubt(pg_dsn: str) -> None:
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            flow = call(run, "a1")
            await send(addon, flow)
            flow.server_conn.timestamp_tcp_setup = 1.0
            flow.response = tutils.tresp(content=b"half an ans")  # the upstream began to answer, then broke
            flow.error = mflow.Error("peer closed connection")
            await addon.error(flow)
            assert [(seq, state) for seq, state, *_ in sql(pg_dsn, STEPS, run)] == [(1, "pending")]
            retry = call(run, "a1")
            assert await send(addon, retry) == "reissued" and retry.metadata[META].seq == 1

    asyncio.run(scenario())


def test_in_doubt_fail_refuses_a_step_in_doubt_with_how_to_resolve_it(pg_dsn: str) -> None:
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            flow = call(run, "a1")
            await send(addon, flow)
            await break_off(addon, flow, connected=True)
        async with sidecar(pg_dsn, durable_in_doubt=["api.test=fail"]) as addon:
            again = call(run, "a2")
            assert await send(addon, again) == "refused"
            status, body = refusal(again)
            assert status == 409 and body["reason"] == (
                "step is in doubt: it was forwarded but its answer was never journaled (durable_in_doubt=fail)"
            )
            assert body["resolve"] == f"durable resolve {run} 1 --reissue | --forget | --complete-from FILE"
            assert (body["run"], body["step"]) == (run, 1)
        async with sidecar(pg_dsn, durable_in_doubt_window="0s") as addon:
            late = call(run, "a3")
            await send(addon, late)
            status, body = refusal(late)
            assert status == 409 and body["reason"] == (
                "step is in doubt for longer than durable_in_doubt_window; the upstream may have "
                "forgotten its idempotency key, so it is not re-sent automatically"
            )
        assert [(seq, state) for seq, state, *_ in sql(pg_dsn, STEPS, run)] == [(1, "pending")]

    asyncio.run(scenario())


def test_a_diverging_call_is_recorded_with_its_divergence_or_refused_when_strict(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            for amount in (5, 6):
                flow = call(run, "a1", body=f'{{"amount": {amount}}}'.encode())
                await send(addon, flow)
                await answer(addon, flow)
            other = call(run, "a2", body=b'{"amount": 7}')
            assert await send(addon, other) == "diverged"
            assert addon.lifecycle.divergences == 1
            await answer(addon, other)
            logged = [r.getMessage() for r in caplog.records if r.name == "durable" and "divergence" in r.getMessage()]
            assert len(logged) == 1 and logged[0].startswith(
                f"durable: divergence #1: run={run} attempt=a2 matches nothing journaled "
                "(2 unconsumed steps ahead, nearest seq 1): "
            )
            assert await send(addon, call(run, "a4", body=b'{"amount": 9}')) == "diverged"
            assert addon.lifecycle.divergences == 2
            ((divergence,),) = sql(pg_dsn, "SELECT divergence FROM durable_steps WHERE run_id = %s AND seq = 3", run)
            assert divergence["attempt"] == "a2" and divergence["expected_step"] == 1 and divergence["diff"]
        async with sidecar(pg_dsn, durable_strict=True) as addon:
            strict = call(run, "a3", body=b'{"amount": 8}')
            assert await send(addon, strict) == "refused"
            status, body = refusal(strict)
            assert status == 409 and body["reason"] == "request diverges from the journal (durable_strict)"
            assert body["expected_step"] == 1
        assert len(sql(pg_dsn, STEPS, run)) == 4  # nothing recorded for the refused call

    asyncio.run(scenario())


def test_a_404_in_an_upstream_session_is_failed_not_the_answer(pg_dsn: str) -> None:
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            in_session = call(run, "a1", body=b'{"m": "tools/call"}', Mcp_Session_Id="s-1")
            await send(addon, in_session)
            await answer(addon, in_session, status=404, body=b"session gone")
            plain = call(run, "a1", body=b'{"m": "lookup"}')
            await send(addon, plain)
            await answer(addon, plain, status=404, body=b"no such thing")
        assert [(seq, state) for seq, state, *_ in sql(pg_dsn, STEPS, run)] == [(1, "failed"), (2, "completed")]

    asyncio.run(scenario())


def test_flows_of_one_step_in_one_sidecar_wait_for_the_one_that_sends_it(pg_dsn: str) -> None:
    """Single flight: while one flow sends a step, the others of the same step wait, then are
    answered from the journal; a sender that breaks off hands the step to exactly one waiter."""
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            sender = call(run, "a1")
            await send(addon, sender)
            key = sender.request.headers["Idempotency-Key"]
            waiters = [call(run, f"w{n}") for n in range(3)]
            tasks = [asyncio.ensure_future(send(addon, flow)) for flow in waiters]
            await asyncio.sleep(0.3)
            assert not any(task.done() for task in tasks)  # waiting, not sent
            await break_off(addon, sender, connected=True)
            await asyncio.sleep(0.3)
            done = [task for task in tasks if task.done()]
            assert len(done) == 1 and done[0].result() == "reissued"  # one, and only one, re-sends it
            resender = waiters[tasks.index(done[0])]
            assert resender.request.headers["Idempotency-Key"] == key
            await answer(addon, resender, body=b"charged once")
            assert sorted(await asyncio.gather(*tasks)) == ["reissued", "replayed", "replayed"]
            for flow in waiters:
                assert flow.response.content == b"charged once"
        assert sql(pg_dsn, STEPS, run) == [(1, "completed", 200, key)]

    asyncio.run(scenario())


def test_a_step_in_flight_in_another_sidecar_is_waited_for_under_either_policy(pg_dsn: str) -> None:
    """Issue 28, bug 8: in flight is not in doubt: even under durable_in_doubt=fail the other sidecar's
    caller waits for the answer, and is answered from the journal."""
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as one, sidecar(pg_dsn, durable_in_doubt=["fail"]) as two:
            sender = call(run, "a1")
            await send(one, sender)
            waiter = call(run, "a2")
            waiting = asyncio.ensure_future(send(two, waiter))
            await asyncio.sleep(0.5)
            assert not waiting.done()
            await answer(one, sender, body=b"from the first sidecar")
            assert await asyncio.wait_for(waiting, 5) == "replayed"
            assert waiter.response.content == b"from the first sidecar"

    asyncio.run(scenario())


def test_a_waiter_whose_agent_hung_up_stops_waiting(pg_dsn: str) -> None:
    """Issue 28, bug 10: it answers 503 at its next look instead of polling for durable_in_flight_wait."""
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as one, sidecar(pg_dsn) as two:
            sender = call(run, "a1")
            await send(one, sender)
            waiter = call(run, "a2")
            waiting = asyncio.ensure_future(send(two, waiter))
            await asyncio.sleep(0.3)
            waiter.client_conn.timestamp_end = 2.0
            assert await asyncio.wait_for(waiting, 5) == "refused"
            status, body = refusal(waiter)
            assert status == 503 and body["reason"] == (
                "this step is in flight in another attempt or sidecar and the agent hung up while it "
                "waited; nothing was forwarded, retry to wait again"
            )
            assert body["step"] == 1
            await answer(one, sender)

    asyncio.run(scenario())


def test_an_sdk_retry_after_a_timeout_is_the_step_its_agent_gave_up_on(pg_dsn: str) -> None:
    """An SDK times out and retries in the same attempt, maybe several times while the upstream still
    works. The call it gave up on becomes an orphan and gives its step back, a retry that gives up
    while it waits gives it back at once, and one whose answer came just as it hung up gives it back
    too: every retry is that one step, and nothing is sent twice."""
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            sender = call(run, "a1")
            await send(addon, sender)
            httplayer.ORPHANS.adopt(sender)  # what mitmproxy's layer does when the agent hangs up mid-call
            impatient = call(run, "a1")
            waiting = asyncio.ensure_future(send(addon, impatient))
            await asyncio.sleep(0.3)
            assert not waiting.done()  # the same step: it waits for the orphan
            impatient.client_conn.timestamp_end = 2.0  # its own timeout
            assert await asyncio.wait_for(waiting, 2) == "refused"
            late = call(run, "a1")
            waiting = asyncio.ensure_future(send(addon, late))
            await asyncio.sleep(0.3)
            slots, leave = addon.lifecycle.in_flight, addon.lifecycle.in_flight.leave

            def hang_up_then_leave(slot: Any) -> None:  # it hangs up as the orphan's answer comes
                late.client_conn.timestamp_end = 2.0
                leave(slot)

            slots.leave = hang_up_then_leave  # type: ignore[method-assign]
            await answer(addon, sender, body=b"generated once")
            slots.leave = leave  # type: ignore[method-assign]
            assert await asyncio.wait_for(waiting, 2) == "replayed"
            last = call(run, "a1")
            assert await send(addon, last) == "replayed" and last.metadata[META].seq == 1
            assert last.response.content == b"generated once"
        assert [seq for seq, *_ in sql(pg_dsn, STEPS, run)] == [1]

    asyncio.run(scenario())


def test_a_step_in_flight_past_the_wait_is_refused_and_its_retry_waits_again(pg_dsn: str) -> None:
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as one, sidecar(pg_dsn, durable_in_flight_wait="0.3s") as two:
            sender = call(run, "a1")
            await send(one, sender)
            waiter = call(run, "a2")
            assert await asyncio.wait_for(send(two, waiter), 5) == "refused"
            assert refusal(waiter)[0] == 503
            await answer(one, sender, body=b"done")
            retry = call(run, "a2")  # the refusal did not consume the step
            assert await send(two, retry) == "replayed" and retry.response.content == b"done"

    asyncio.run(scenario())


def test_a_body_that_decodes_past_the_cap_or_lies_about_its_encoding_is_refused_unsent(pg_dsn: str) -> None:
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn, durable_body_cap=1000) as addon:
            bomb = call(run, "a1", body=gzip.compress(b"0" * 5000), Content_Encoding="gzip")
            assert await send(addon, bomb) == "refused"
            status, body = refusal(bomb)
            assert status == 413 and body["reason"].endswith("; nothing was forwarded") and body["run"] == run
            assert "1000" in body["reason"]
            broken = call(run, "a1", body=b"not gzip at all", Content_Encoding="gzip")
            assert await send(addon, broken) == "refused"
            status, body = refusal(broken)
            assert status == 400 and body["reason"].startswith("request body does not match its Content-Encoding: ")
        assert sql(pg_dsn, STEPS, run) == []

    asyncio.run(scenario())


def test_a_run_journaled_with_an_unknown_fingerprint_version_is_refused(pg_dsn: str) -> None:
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            flow = call(run, "a1")
            await send(addon, flow)
            await answer(addon, flow)
        sql(pg_dsn, "UPDATE durable_steps SET fp_version = 99 WHERE run_id = %s", run)
        async with sidecar(pg_dsn) as addon:  # a sidecar older than the one that journaled the run
            later = call(run, "a2")
            assert await send(addon, later) == "refused"
            status, body = refusal(later)
            assert status == 409 and body["reason"] == f"run {run} was journaled with fingerprint v99, unknown to this sidecar"

    asyncio.run(scenario())


def test_a_held_answer_is_journaled_when_the_agent_asks_again(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The upstream answered but the journal would not take it: the sidecar holds the answer. The
    agent's retry commits it there and then: a 503 while the journal still refuses (not a wait),
    the upstream's answer from the journal once it takes it, and never a second send."""
    monkeypatch.setattr(repairs, "RETRY_S", 60.0)  # only the agent's retries commit it in this test
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            journal = addon.lifecycle.journal
            complete, refusals = journal.complete, [JournalError("connection lost"), JournalError("still down")]

            async def flaky_complete(*args: Any, **kwargs: Any) -> None:
                if refusals:
                    raise refusals.pop(0)
                await complete(*args, **kwargs)

            monkeypatch.setattr(journal, "complete", flaky_complete)
            first = call(run, "a1")
            await send(addon, first)
            key = first.request.headers["Idempotency-Key"]
            await answer(addon, first, body=b"paid")
            status, body = refusal(first)
            assert status == 503 and "holds the answer" in body["reason"]
            assert sql(pg_dsn, STEPS, run) == [(1, "pending", None, key)]
            held = f"durable: run={run} seq=1 the journal could not record the answer: held (1 held), its commit retried"
            assert held in [r.getMessage() for r in caplog.records if r.name == "durable"]

            retry = call(run, "a1")
            assert await send(addon, retry) == "refused"
            status, body = refusal(retry)
            assert (status, body["reason"]) == (503, "journal unavailable: nothing was forwarded")
            again = call(run, "a1")
            assert await send(addon, again) == "replayed" and again.response.content == b"paid"
            assert sql(pg_dsn, STEPS, run) == [(1, "completed", 200, key)]

    asyncio.run(scenario())


EVENTS = [b'data: {"delta": "Hel"}\n\n', b'data: {"delta": "lo"}\n\n', b"data: [DONE]\n\n"]
STREAMED = "SELECT state, response_body, streamed, truncated, chunk_timing IS NOT NULL FROM durable_steps WHERE run_id = %s"


def test_a_streamed_answer_is_journaled_whole_and_replayed_byte_identical(pg_dsn: str) -> None:
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            flow = call(run, "a1")
            await send(addon, flow)
            assert await stream(addon, flow, EVENTS) == b"".join(EVENTS)
            await addon.response(flow)
            assert sql(pg_dsn, STREAMED, run) == [("completed", b"".join(EVENTS), True, False, True)]
            again = call(run, "a2")
            assert await send(addon, again) == "replayed" and again.response.content == b"".join(EVENTS)

    asyncio.run(scenario())


def test_a_stream_cut_short_is_in_doubt_and_its_retry_re_sends_it(pg_dsn: str) -> None:
    """Cut before its end (no end marker): the agent saw a partial answer, so the step goes back to
    the attempt and the retry is the same step. Cut after its end marker: it is whole, journaled."""
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            for cut_by in ("close", "error"):
                flow = call(run, "a1")
                await send(addon, flow)
                assert flow.metadata[META].seq == 1  # the same step, each time
                await stream(addon, flow, EVENTS[:2], end=False)
                if cut_by == "close":
                    await addon.response(flow)
                else:
                    flow.error = mflow.Error("peer closed connection")
                    await addon.error(flow)
                state, body, *_ = sql(pg_dsn, STREAMED, run)[0]
                assert state == "pending" and len(sql(pg_dsn, STEPS, run)) == 1
            whole = call(run, "a1")
            assert await send(addon, whole) == "reissued"
            await stream(addon, whole, EVENTS, end=False)  # the end marker came, then the link broke
            whole.error = mflow.Error("peer closed connection")
            await addon.error(whole)
            assert sql(pg_dsn, STREAMED, run) == [("completed", b"".join(EVENTS), True, False, True)]

    asyncio.run(scenario())


def test_a_stream_over_the_cap_reaches_the_agent_whole_and_stays_in_doubt(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Past durable_body_cap nothing more is kept: the agent gets it all, the journal does not, so the
    step stays in doubt for a later attempt; this attempt moved past it (its next call is a new step)."""
    run = new_run()
    events = [b"data: " + b"x" * 400 + b"\n\n"] * 3 + [b"data: [DONE]\n\n"]

    async def scenario() -> None:
        async with sidecar(pg_dsn, durable_body_cap=1000) as addon:
            flow = call(run, "a1")
            await send(addon, flow)
            assert await stream(addon, flow, events) == b"".join(events)
            await addon.response(flow)
            assert flow.response.headers["Durable-Outcome"] == "recorded"
            assert [(seq, state) for seq, state, *_ in sql(pg_dsn, STEPS, run)] == [(1, "pending")]
            expected = (
                f"durable: run={run} seq=1 response of {len(b''.join(events))} bytes is over durable_body_cap: "
                "streamed through, not journaled; the step stays in doubt and a later attempt re-sends it"
            )
            assert expected in [r.getMessage() for r in caplog.records if r.name == "durable"]
            following = call(run, "a1")
            assert await send(addon, following) == "recorded" and following.metadata[META].seq == 2

    asyncio.run(scenario())


def test_calls_of_one_step_from_two_attempts_at_once_are_sent_once(pg_dsn: str) -> None:
    """Both attempts look the step up before either journals it: one records and sends it, the other
    finds it journaled when it gets its turn, and is answered from the journal."""
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            flows = [call(run, "a1"), call(run, "a2")]
            tasks = [asyncio.ensure_future(send(addon, flow)) for flow in flows]
            await asyncio.sleep(0.3)
            (done,) = [task for task in tasks if task.done()]
            assert done.result() == "recorded"
            sender, waiter = (flows[0], flows[1]) if done is tasks[0] else (flows[1], flows[0])
            await answer(addon, sender, body=b"once")
            assert await asyncio.wait_for(tasks[flows.index(waiter)], 5) == "replayed"
            assert waiter.response.content == b"once"
        assert [(seq, state) for seq, state, *_ in sql(pg_dsn, STEPS, run)] == [(1, "completed")]

    asyncio.run(scenario())


def test_an_agent_that_hangs_up_after_its_answer_changes_nothing(pg_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            flow = call(run, "a1")
            await send(addon, flow)
            await answer(addon, flow, body=b"kept")
            before = sql(pg_dsn, "SELECT state, response_body, completed_at FROM durable_steps WHERE run_id = %s", run)
            flow.error = mflow.Error("client disconnected")
            await addon.error(flow)
            after = sql(pg_dsn, "SELECT state, response_body, completed_at FROM durable_steps WHERE run_id = %s", run)
            assert before == after and before[0][:2] == ("completed", b"kept")
            assert not [r for r in caplog.records if r.levelname in ("ERROR", "WARNING") and r.name == "durable"]

    asyncio.run(scenario())


def test_answers_past_what_the_sidecar_may_hold_are_dropped_in_doubt(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Held answers are bounded (repairs.HELD_MAX_BYTES, counted by body size): one that does not fit
    is dropped, its step left in doubt for the next attempt, and the agent told so; an empty one fits."""
    monkeypatch.setattr(repairs, "HELD_MAX_BYTES", 3)
    monkeypatch.setattr(repairs, "RETRY_S", 60.0)
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            monkeypatch.setattr(addon.lifecycle.journal, "complete", journal_down)
            big = call(run, "a1", body=b'{"n": 1}')
            await send(addon, big)
            await answer(addon, big, body=b"x" * 100)
            status, body = refusal(big)
            assert status == 503 and "stays in doubt and the next attempt re-sends it" in body["reason"]
            dropped = f"durable: run={run} seq=1 answer dropped: over the answers the sidecar holds"
            assert dropped in [r.getMessage() for r in caplog.records if r.name == "durable"]
            empty = call(run, "a1", body=b'{"n": 2}')
            await send(addon, empty)
            await answer(addon, empty, body=b"")
            assert "holds the answer" in refusal(empty)[1]["reason"]
            assert len(addon.lifecycle.repairs.held) == 1  # the empty answer, and only it

    asyncio.run(scenario())


def test_redacted_fields_of_a_request_body_are_journaled_hashed_and_sent_as_they_are(pg_dsn: str) -> None:
    run = new_run()
    body = b'{"amount": 5, "card": {"number": "4242424242424242"}}'

    async def scenario() -> None:
        async with sidecar(pg_dsn, durable_redact_json=["/card/number"]) as addon:
            flow = call(run, "a1", body=body)
            await send(addon, flow)
            assert flow.request.content == body  # the upstream gets the card number
            await answer(addon, flow)
            (stored,) = sql(pg_dsn, "SELECT request_body FROM durable_steps WHERE run_id = %s", run)[0]
            assert b"4242424242424242" not in stored and b"amount" in stored
            again = call(run, "a2", body=body)
            assert await send(addon, again) == "replayed"  # matched on the fingerprint, not the stored body

    asyncio.run(scenario())


def test_a_step_deleted_under_a_running_attempt_is_refused_not_sent(pg_dsn: str) -> None:
    """The attempt's index names a completed step that an operator deleted meanwhile: 503, nothing
    sent (its answer cannot be replayed and sending it again might charge twice). No read-ahead:
    an answer read ahead before the delete is replayed from memory, which is no wrong answer."""
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn, durable_read_ahead_bytes=0) as addon:
            for n in (1, 2):
                flow = call(run, "a1", body=f'{{"n": {n}}}'.encode())
                await send(addon, flow)
                await answer(addon, flow)
            first = call(run, "a2", body=b'{"n": 1}')
            assert await send(addon, first) == "replayed"  # the attempt's index is loaded now
            sql(pg_dsn, "DELETE FROM durable_steps WHERE run_id = %s AND seq = 2", run)
            second = call(run, "a2", body=b'{"n": 2}')
            assert await send(addon, second) == "refused"
            status, body = refusal(second)
            assert status == 503 and body["failed"] == f"read journaled response: step {run}/2 is gone"
            doubt = call(run, "a2", body=b'{"n": 3}')
            await send(addon, doubt)
            await break_off(addon, doubt, connected=True)  # in doubt: the retry would re-send it...
            sql(pg_dsn, "DELETE FROM durable_steps WHERE run_id = %s AND seq = 3", run)  # ...had it not gone
            retry = call(run, "a2", body=b'{"n": 3}')
            assert await send(addon, retry) == "refused"
            assert refusal(retry)[1]["failed"] == f"step {run}/3 is gone"

    asyncio.run(scenario())


def test_with_replay_pacing_a_recorded_stream_is_replayed_through_the_pacer(pg_dsn: str) -> None:
    """Only a stream with its chunk timing goes to the pacer (the flow is sent to its local port and
    answered there at the recorded pace); a whole answer is replayed at once."""
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            streamed = call(run, "a1", body=b'{"stream": true}')
            await send(addon, streamed)
            await stream(addon, streamed, EVENTS)
            await addon.response(streamed)
            whole = call(run, "a1", body=b'{"stream": false}')
            await send(addon, whole)
            await answer(addon, whole)
        async with sidecar(pg_dsn, durable_replay_pacing=True) as addon:
            assert addon.lifecycle.pacer is not None
            await addon.lifecycle.pacer.start()
            paced = call(run, "a2", body=b'{"stream": true}')
            assert await send(addon, paced) == "replayed" and paced.metadata[META].paced
            assert paced.response is None
            assert (paced.request.host, paced.request.port) == ("127.0.0.1", addon.lifecycle.pacer.port)
            at_once = call(run, "a2", body=b'{"stream": false}')
            assert await send(addon, at_once) == "replayed" and not at_once.metadata[META].paced
            assert at_once.response is not None and at_once.request.host == "api.test"
        async with sidecar(pg_dsn) as addon:  # pacing off: the stream is replayed at once
            plain = call(run, "a3", body=b'{"stream": true}')
            assert await send(addon, plain) == "replayed" and plain.response.content == b"".join(EVENTS)

    asyncio.run(scenario())


def test_a_gzip_answer_is_replayed_as_journaled_to_a_client_that_takes_gzip_and_decoded_for_one_that_does_not(
    pg_dsn: str,
) -> None:
    run = new_run()
    plain = b'{"charged": 5}' * 20

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            flow = call(run, "a1", Accept_Encoding="gzip")
            await send(addon, flow)
            flow.server_conn.timestamp_tcp_setup = 1.0
            compressed = gzip.compress(plain, mtime=0)
            flow.response = http.Response.make(200, b"", {"content-encoding": "gzip"})
            flow.response.raw_content = compressed
            flow.response.headers["content-length"] = str(len(compressed))
            addon.responseheaders(flow)
            await addon.response(flow)
            takes_gzip = call(run, "a2", Accept_Encoding="gzip, br")
            await send(addon, takes_gzip)
            assert takes_gzip.response.raw_content == compressed  # byte-identical
            no_gzip = call(run, "a3")
            await send(addon, no_gzip)
            assert no_gzip.response.raw_content == plain and "content-encoding" not in no_gzip.response.headers

    asyncio.run(scenario())


def test_a_pending_commit_whose_reply_was_lost_is_sent_once_as_recorded(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal committed the pending step but its reply never came: the call was not sent (the
    agent got a 503). The agent's retry finds the row, and sends it as its first send, not a reissue."""
    monkeypatch.setattr(repairs, "RETRY_S", 60.0)  # no hand-back in the background meanwhile
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            journal = addon.lifecycle.journal
            record = journal.record

            async def reply_lost(step: Any) -> Any:
                await record(step)
                raise JournalError("record pending step: connection lost")

            monkeypatch.setattr(journal, "record", reply_lost)
            first = call(run, "a1")
            assert await send(addon, first) == "refused" and refusal(first)[0] == 503
            monkeypatch.setattr(journal, "record", record)
            assert sql(pg_dsn, "SELECT seq, state FROM durable_steps WHERE run_id = %s", run) == [(1, "pending")]
            retry = call(run, "a1")
            assert await send(addon, retry) == "recorded" and retry.metadata[META].seq == 1
            assert retry.request.headers["Idempotency-Key"] == sql(pg_dsn, STEPS, run)[0][3]
            await answer(addon, retry)
            assert [(seq, state) for seq, state, *_ in sql(pg_dsn, STEPS, run)] == [(1, "completed")]

    asyncio.run(scenario())


def test_a_step_left_in_flight_by_a_dead_sidecar_is_re_sent_after_the_lease_grace(pg_dsn: str) -> None:
    """Its lease is free but it is not taken over at once (a sidecar may be between losing its lease
    and taking it again): after durable_lease_grace it is, with the step's idempotency key."""
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn, durable_lease_grace="1.5s") as survivor:
            async with sidecar(pg_dsn) as dying:
                sent = call(run, "a1")
                await send(dying, sent)
                key = sent.request.headers["Idempotency-Key"]
            # the first sidecar is gone (its lease with it), its call never answered
            retry = call(run, "a2")
            waiting = asyncio.ensure_future(send(survivor, retry))
            await asyncio.sleep(0.5)
            assert not waiting.done()  # within the grace: still the dead sidecar's
            assert await asyncio.wait_for(waiting, 5) == "reissued"
            assert retry.request.headers["Idempotency-Key"] == key

    asyncio.run(scenario())


def test_a_whole_answer_whose_commit_fails_as_the_agent_hangs_up_is_held_a_cut_one_is_not(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The error hook with a streamed answer in hand: a whole one (its end marker came) is held and
    committed later, like a finished one; a cut one never is: the step stays in doubt."""
    monkeypatch.setattr(repairs, "RETRY_S", 60.0)
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            monkeypatch.setattr(addon.lifecycle.journal, "complete", journal_down)
            whole = call(run, "a1", body=b'{"n": 1}')
            await send(addon, whole)
            await stream(addon, whole, EVENTS, end=False)  # its end marker came: the answer is whole
            whole.error = mflow.Error("client disconnected")
            await addon.error(whole)
            assert len(addon.lifecycle.repairs.held) == 1
            cut = call(run, "a1", body=b'{"n": 2}')
            await send(addon, cut)
            await stream(addon, cut, EVENTS[:1], end=False)
            cut.error = mflow.Error("peer closed connection")
            await addon.error(cut)
            assert len(addon.lifecycle.repairs.held) == 1  # the cut answer is not kept
            logged = [r.getMessage() for r in caplog.records if r.name == "durable" and r.levelname == "ERROR"]
            assert logged == [f"durable: run={run} seq=2 failure not journaled (connection lost); step stays in doubt"]

    asyncio.run(scenario())


def test_a_step_neither_recorded_nor_found_is_refused(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The insert found the step journaled already, and then it was gone (deleted meanwhile): 503."""
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:

            async def nothing(*args: Any) -> None:
                return None

            monkeypatch.setattr(addon.lifecycle.journal, "record", nothing)
            monkeypatch.setattr(addon.lifecycle.journal, "find", nothing)
            flow = call(run, "a1")
            assert await send(addon, flow) == "refused"
            status, body = refusal(flow)
            key = flow.metadata[META].seq  # None: nothing was journaled
            assert status == 503 and key is None and body["failed"].endswith("#0 neither recorded nor found")
            assert body["failed"].startswith("step v")

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "point, journaled",
    [
        ("before-pending-commit", []),
        ("after-pending-commit", [(1, "pending")]),
        ("before-complete-commit", [(1, "pending")]),
        ("after-complete-commit", [(1, "completed")]),
        ("", [(1, "completed")]),
    ],
)
def test_the_sidecar_dies_exactly_at_each_crash_point(pg_dsn: str, point: str, journaled: list[tuple]) -> None:
    """DURABLE_FAULT, the chaos tests' seam (test_chaos.py kills a live sidecar at each point): here
    each point is checked to sit where its name says, by what the journal holds when it fires."""
    run = new_run()
    script = (
        "import asyncio, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from inprocess import answer, call, send, sidecar\n"
        "async def main():\n"
        f"    async with sidecar({pg_dsn!r}) as addon:\n"
        f"        flow = call({run!r}, 'a1')\n"
        "        await send(addon, flow)\n"
        "        await answer(addon, flow)\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ, "DURABLE_FAULT": point}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == (-signal.SIGKILL if point else 0), proc.stderr
    assert [(seq, state) for seq, state, *_ in sql(pg_dsn, STEPS, run)] == journaled


def test_an_empty_answer_is_journaled_empty_with_how_long_it_took(pg_dsn: str) -> None:
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            flow = call(run, "a1")
            await send(addon, flow)
            await asyncio.sleep(0.2)  # the upstream takes its time
            await answer(addon, flow, status=204, body=b"")
            again = call(run, "a2")
            assert await send(addon, again) == "replayed"
            assert (again.response.status_code, again.response.content) == (204, b"")
        ((body, duration_ms),) = sql(pg_dsn, "SELECT response_body, duration_ms FROM durable_steps WHERE run_id = %s", run)
        assert body == b"" and 150 <= duration_ms < 10_000  # milliseconds from request to answer

    asyncio.run(scenario())


def test_under_in_doubt_fail_a_dead_sidecars_step_is_waited_for_through_the_grace_then_refused(pg_dsn: str) -> None:
    """Within durable_lease_grace the owner may still come back (it is dying, not dead): wait. After
    it, the step is in doubt, and durable_in_doubt=fail refuses it for an operator to resolve."""
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn, durable_lease_grace="1.5s", durable_in_doubt=["fail"]) as survivor:
            async with sidecar(pg_dsn) as dying:
                await send(dying, call(run, "a1"))
            retry = call(run, "a2")
            waiting = asyncio.ensure_future(send(survivor, retry))
            await asyncio.sleep(0.5)
            assert not waiting.done()  # within the grace: waited for, not refused
            assert await asyncio.wait_for(waiting, 5) == "refused"
            status, body = refusal(retry)
            assert status == 409 and body["resolve"].startswith(f"durable resolve {run} 1 ")

    asyncio.run(scenario())
