"""The addon's hooks fail closed: whatever goes wrong, the flow gets an error response and is not
forwarded (mitmproxy forwards a flow whose hook raised). The journal is mocked: pure hook logic."""

from __future__ import annotations

import asyncio
import json

import pytest
from mitmproxy.test import taddons, tflow

from durable_sidecar.store import crypto
from durable_sidecar.store.journal import JournalError
from durable_sidecar.proxy.sidecar import META, DurableSidecar


def flow_with_run(run: str = "r1"):
    flow = tflow.tflow()
    flow.request.headers["Durable-Run-Id"] = run
    flow.request.headers["Durable-Attempt"] = "a1"
    return flow


@pytest.fixture
def sidecar(mocker):
    addon = DurableSidecar()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, durable_dsn="postgresql://unused")
        addon.lifecycle.journal = addon.lifecycle.positions.journal = mocker.Mock()
        addon.lifecycle.journal.keyring = crypto.Keyring("")  # no encryption key: URLs stored as they are
        addon.lifecycle.journal.load_index = mocker.AsyncMock(return_value=None)
        addon.lifecycle.journal.find = mocker.AsyncMock(return_value=None)  # asked while the index streams in
        addon.lifecycle.journal.owner = mocker.AsyncMock(return_value=7)
        addon.lifecycle.journal.fp_version = mocker.AsyncMock(return_value=None)  # a new run
        addon.lifecycle.journal.target = None  # not opened: no address of its own to keep agents from
        yield addon


def test_journal_failure_on_record_answers_503(sidecar, mocker) -> None:
    sidecar.lifecycle.journal.record = mocker.AsyncMock(side_effect=JournalError("record pending step: connection lost"))
    flow = flow_with_run()
    asyncio.run(sidecar.request(flow))
    assert flow.response is not None and flow.response.status_code == 503
    body = json.loads(flow.response.content)
    assert body["reason"] == "journal unavailable: nothing was forwarded" and "connection lost" in body["failed"]
    assert flow.metadata[META].outcome == "refused"


def test_unexpected_error_answers_503_too(sidecar, mocker) -> None:
    sidecar.lifecycle.journal.load_index = mocker.AsyncMock(side_effect=RuntimeError("boom"))
    flow = flow_with_run()
    asyncio.run(sidecar.request(flow))
    assert flow.response.status_code == 503 and "RuntimeError: boom" in json.loads(flow.response.content)["failed"]


def test_failed_index_load_is_retried_by_the_next_request(sidecar, mocker) -> None:
    sidecar.lifecycle.journal.load_index = mocker.AsyncMock(side_effect=[JournalError("down"), None])
    sidecar.lifecycle.journal.record = mocker.AsyncMock(side_effect=JournalError("still down"))
    asyncio.run(sidecar.request(flow_with_run()))
    asyncio.run(sidecar.request(flow_with_run()))
    assert sidecar.lifecycle.journal.load_index.await_count == 2


@pytest.mark.parametrize("failure", ["unreachable", "not ours"])
def test_response_not_journaled_replaces_the_answer_with_503(sidecar, mocker, failure: str) -> None:
    """A commit that fails holds the answer (retried until journaled); one refused because the step
    is no longer this sidecar's leaves it in doubt. Either way the agent gets a 503 and its step back."""
    from durable_sidecar.store.journal import NotOurs, Recorded

    error = JournalError("journal response: disk full") if failure == "unreachable" else NotOurs("taken over")
    sidecar.lifecycle.journal.record = mocker.AsyncMock(return_value=Recorded(seq=1, idempotency_key=None))
    sidecar.lifecycle.journal.complete = mocker.AsyncMock(side_effect=error)
    flow = flow_with_run()
    asyncio.run(sidecar.request(flow))
    assert flow.response is None  # journaled as pending: free to go upstream
    flow.response = tflow.tresp()
    asyncio.run(sidecar.response(flow))
    assert flow.response.status_code == 503 and flow.response.headers["Durable-Outcome"] == "refused"
    reason = json.loads(flow.response.content)["reason"]
    assert ("holds the answer" in reason) == (failure == "unreachable")
    assert ("stays in doubt" in reason) == (failure == "not ours")
    assert len(sidecar.lifecycle.repairs.held) == (failure == "unreachable")
    # the error is the sidecar's: the step is given back, so the agent's retry is the same occurrence
    cursor = sidecar.lifecycle.positions.cursors[("r1", "a1")].cursor
    (key, given_back), = cursor.returned.items()
    assert given_back == [0] and cursor.claim(key).occurrence == 0


def test_control_headers_are_stripped_before_forwarding(sidecar, mocker) -> None:
    from durable_sidecar.store.journal import Recorded

    sidecar.lifecycle.journal.record = mocker.AsyncMock(return_value=Recorded(seq=1, idempotency_key=None))
    flow = flow_with_run()
    flow.request.headers["Durable-Step-Key"] = "k"
    flow.request.headers["Proxy-Authorization"] = "Basic cjE6YTE="
    asyncio.run(sidecar.request(flow))
    assert not [k for k in flow.request.headers if k.lower().startswith("durable-") or k.lower() == "proxy-authorization"]


def test_a_digest_shared_by_two_keys_is_refused_not_answered_with_the_other_step(sidecar, mocker) -> None:
    """The replay index names steps by a 64-bit digest of (key, occurrence). Were two keys to share
    one, the journaled row (which names its own key) shows it: 503, never another call's answer."""
    from durable_sidecar.store import cursor as cursor_module
    from durable_sidecar.store.journal import StoredResponse

    mocker.patch.object(cursor_module, "digest", lambda key, occurrence: 7)  # every key collides
    fill = lambda run, into, *_: into.load([(7, 1, "completed")])  # noqa: E731
    sidecar.lifecycle.journal.load_index = mocker.AsyncMock(side_effect=fill)
    other = StoredResponse("completed", 200, "OK", "HTTP/1.1", [], b"someone else's answer", None, key="v1:other")
    sidecar.lifecycle.journal.responses = mocker.AsyncMock(return_value={1: other})
    sidecar.lifecycle.journal.choices = mocker.AsyncMock(return_value={})  # no header chooses among them
    flow = flow_with_run()
    asyncio.run(sidecar.request(flow))
    assert flow.response.status_code == 503 and b"someone else" not in flow.response.content
    assert json.loads(flow.response.content)["failed"] == "read journaled response: step r1/1 answers another request"


# -- resuming a long run: the index streams in while the attempt is already answered -------------


def test_a_completed_step_is_replayed_before_the_runs_index_has_loaded(sidecar, mocker) -> None:
    """The first request of an attempt on a long run does not wait for the run's whole index: a
    completed step is found by one indexed lookup and replayed while the index still loads."""
    from durable_sidecar.store.cursor import StepRef
    from durable_sidecar.store.journal import StoredResponse

    async def scenario() -> None:
        never = asyncio.Event()

        async def load_forever(run, into, *_) -> None:
            await never.wait()

        journal = sidecar.lifecycle.journal
        journal.load_index = mocker.AsyncMock(side_effect=load_forever)
        journal.find = mocker.AsyncMock(side_effect=lambda run, key, occ: StepRef(1, key, occ, "completed"))
        journal.responses = mocker.AsyncMock(
            side_effect=lambda run, seqs: {
                1: StoredResponse("completed", 200, "OK", "HTTP/1.1", [], b"journaled", None,
                                  key=journal.find.call_args.args[1], occurrence=0)
            }
        )
        journal.note_replay = mocker.Mock()
        journal.choices = mocker.AsyncMock(return_value={0: None})  # one step, chosen by no header
        flow = flow_with_run()
        await asyncio.wait_for(sidecar.request(flow), 10)
        assert flow.response is not None and flow.response.content == b"journaled"
        assert flow.metadata[META].outcome == "replayed" and not journal.record.called
        assert not sidecar.lifecycle.positions.cursors[("r1", "a1")].index.done()  # the index is still loading

    asyncio.run(scenario())


def test_a_new_request_waits_for_the_whole_index_before_it_is_recorded(sidecar, mocker) -> None:
    """What is not a completed step (here: nothing journaled) is matched against the whole index
    only: recording it from a partial one could journal a step twice."""
    from durable_sidecar.store.journal import Recorded

    async def scenario() -> None:
        loaded = asyncio.Event()

        async def load_when_told(run, into, *_) -> None:
            await loaded.wait()

        journal = sidecar.lifecycle.journal
        journal.load_index = mocker.AsyncMock(side_effect=load_when_told)
        journal.record = mocker.AsyncMock(return_value=Recorded(seq=1, idempotency_key=None))
        request = asyncio.ensure_future(sidecar.request(flow_with_run()))
        await asyncio.sleep(0.05)
        assert not request.done() and not journal.record.called and journal.find.await_count == 1
        loaded.set()
        await asyncio.wait_for(request, 10)
        assert journal.record.await_count == 1

    asyncio.run(scenario())
