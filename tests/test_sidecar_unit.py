"""The addon's hooks fail closed: whatever goes wrong, the flow gets an error response and is not
forwarded (mitmproxy forwards a flow whose hook raised). The journal is mocked: pure hook logic."""

from __future__ import annotations

import asyncio
import json

import pytest
from mitmproxy.test import taddons, tflow

from durable_sidecar.cursor import RunCursor
from durable_sidecar.journal import JournalError
from durable_sidecar.sidecar import META, DurableSidecar


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
        addon.lifecycle.journal = mocker.Mock()
        addon.lifecycle.journal.load_cursor = mocker.AsyncMock(return_value=RunCursor())
        addon.lifecycle.journal.owner = mocker.AsyncMock(return_value=7)
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
    sidecar.lifecycle.journal.load_cursor = mocker.AsyncMock(side_effect=RuntimeError("boom"))
    flow = flow_with_run()
    asyncio.run(sidecar.request(flow))
    assert flow.response.status_code == 503 and "RuntimeError: boom" in json.loads(flow.response.content)["failed"]


def test_failed_cursor_load_is_retried_by_the_next_request(sidecar, mocker) -> None:
    sidecar.lifecycle.journal.load_cursor = mocker.AsyncMock(side_effect=[JournalError("down"), RunCursor()])
    sidecar.lifecycle.journal.record = mocker.AsyncMock(side_effect=JournalError("still down"))
    asyncio.run(sidecar.request(flow_with_run()))
    asyncio.run(sidecar.request(flow_with_run()))
    assert sidecar.lifecycle.journal.load_cursor.await_count == 2


def test_response_not_journaled_replaces_the_answer_with_503(sidecar, mocker) -> None:
    from durable_sidecar.journal import Recorded

    sidecar.lifecycle.journal.record = mocker.AsyncMock(return_value=Recorded(seq=1, idempotency_key=None))
    sidecar.lifecycle.journal.complete = mocker.AsyncMock(side_effect=JournalError("journal response: disk full"))
    flow = flow_with_run()
    asyncio.run(sidecar.request(flow))
    assert flow.response is None  # journaled as pending: free to go upstream
    flow.response = tflow.tresp()
    asyncio.run(sidecar.response(flow))
    assert flow.response.status_code == 503 and flow.response.headers["Durable-Outcome"] == "refused"
    assert "stays in doubt" in json.loads(flow.response.content)["reason"]
    # the error is the sidecar's: the step is given back, so the agent's retry is the same occurrence
    cursor = sidecar.lifecycle.cursors[("r1", "a1")].result()
    (key, given_back), = cursor.returned.items()
    assert given_back == [0] and cursor.claim(key).occurrence == 0


def test_control_headers_are_stripped_before_forwarding(sidecar, mocker) -> None:
    from durable_sidecar.journal import Recorded

    sidecar.lifecycle.journal.record = mocker.AsyncMock(return_value=Recorded(seq=1, idempotency_key=None))
    flow = flow_with_run()
    flow.request.headers["Durable-Step-Key"] = "k"
    flow.request.headers["Proxy-Authorization"] = "Basic cjE6YTE="
    asyncio.run(sidecar.request(flow))
    assert not [k for k in flow.request.headers if k.lower().startswith("durable-") or k.lower() == "proxy-authorization"]


def test_a_digest_shared_by_two_keys_is_refused_not_answered_with_the_other_step(sidecar, mocker) -> None:
    """The replay index names steps by a 64-bit digest of (key, occurrence). Were two keys to share
    one, the journaled row (which names its own key) shows it: 503, never another call's answer."""
    from durable_sidecar import cursor as cursor_module
    from durable_sidecar.journal import StoredResponse

    mocker.patch.object(cursor_module, "digest", lambda key, occurrence: 7)  # every key collides
    index = RunCursor()
    index.load([(7, 1, "completed")])
    sidecar.lifecycle.journal.load_cursor = mocker.AsyncMock(return_value=index)
    other = StoredResponse("completed", 200, "OK", "HTTP/1.1", [], b"someone else's answer", None, key="v1:other")
    sidecar.lifecycle.journal.responses = mocker.AsyncMock(return_value={1: other})
    flow = flow_with_run()
    asyncio.run(sidecar.request(flow))
    assert flow.response.status_code == 503 and b"someone else" not in flow.response.content
    assert "answers another request" in json.loads(flow.response.content)["failed"]
