"""WebSocket conversations in process (proxy/conversations.py): the addon's WebSocket hooks driven
with mitmproxy's test flows on a real journal, the agent's and the upstream's messages played by
hand, and the upstream a conversation opens itself after a replay a real one (scripts/ws_api.py).
The first tier of mutation testing for conversations; tests/test_websocket.py runs the same through
real processes."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import sql
from inprocess import new_run, sidecar
from mitmproxy import http
from mitmproxy.test import tflow
from mitmproxy.websocket import WebSocketData, WebSocketMessage
from wsproto.frame_protocol import Opcode

from durable_sidecar.proxy import conversations, ws_batch, ws_close, ws_resume
from durable_sidecar.proxy import sidecar as sidecar_module
from durable_sidecar.proxy.sidecar import META, DurableSidecar
from durable_sidecar.store.journal import JournalError, NotOurs

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
import ws_api  # noqa: E402

WS_STEPS = "SELECT seq, method, state, status, response_body FROM durable_steps WHERE run_id = %s ORDER BY seq"


@pytest.fixture(scope="module")
def upstream() -> Iterator[ws_api.Server]:
    server = ws_api.Server()  # plain ws://: what the sidecar opens after a replay
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def batched(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in mitmdump, where the addon's load installs ws_batch's layer (played by Conversation._message)."""
    monkeypatch.setattr(ws_batch, "installed", True)


@pytest.fixture
def hung_up(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    """The closes the sidecar sends the agent, code and reason (ws_close.close needs the proxy core)."""
    closes: list[tuple[int, str]] = []
    monkeypatch.setattr(ws_close, "close", lambda flow, code, reason: closes.append((code, reason)))
    return closes


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch, hung_up: list[tuple[int, str]]) -> list[tuple[bytes, bool]]:
    """What the sidecar injects toward the agent (mitmproxy's inject.websocket needs its proxy core)."""
    received: list[tuple[bytes, bool]] = []
    monkeypatch.setattr(sidecar_module, "inject", lambda flow, content, text: received.append((content, text)))
    return received


class Conversation:
    """One agent's WebSocket connection through the sidecar, its hooks fired as mitmproxy fires them."""

    def __init__(
        self,
        addon: DurableSidecar,
        run: str,
        attempt: str,
        port: int,
        path: str = "/v1/responses",
        key: str = "dGhlIHNhbXBsZSBub25jZQ==",
    ) -> None:
        self.addon = addon
        self.flow = tflow.twebsocketflow(messages=False)
        self.flow.live = True
        self.flow.response = None
        self.flow.websocket = None
        req = self.flow.request
        req.host, req.port, req.path = "127.0.0.1", port, path
        req.headers["sec-websocket-key"] = key
        req.headers["Durable-Run-Id"], req.headers["Durable-Attempt"] = run, attempt
        self.flow.server_conn.timestamp_start = None  # nothing connected upstream yet

    async def open(self, greeting: list[bytes] = ()) -> str:
        """The handshake: the request hook, then (when it was let go) the upstream's 101 and greeting."""
        await self.addon.request(self.flow)
        outcome = self.flow.metadata[META].outcome
        if outcome in ("recorded", "reissued"):
            self.flow.server_conn.timestamp_start = self.flow.server_conn.timestamp_tcp_setup = 1.0
            self.flow.response = http.Response.make(101, b"", {"upgrade": "websocket", "connection": "Upgrade"})
            self.addon.responseheaders(self.flow)
        self.flow.websocket = WebSocketData()  # mitmproxy sets it before the response hook, for a 101
        await self.addon.response(self.flow)
        await self.addon.websocket_start(self.flow)
        for frame in greeting:
            await self.server(frame)
        return outcome

    async def client(self, content: bytes | str) -> WebSocketMessage:
        """The agent sends a message; returned as the hook left it (dropped: it never left)."""
        return await self._message(content, from_client=True)

    async def server(self, content: bytes | str) -> WebSocketMessage:
        """The upstream answers through mitmproxy's own server connection."""
        return await self._message(content, from_client=False)

    async def _message(self, content: bytes | str, from_client: bool) -> WebSocketMessage:
        text = isinstance(content, str)
        data = content.encode() if isinstance(content, str) else content
        message = WebSocketMessage(Opcode.TEXT if text else Opcode.BINARY, from_client, data)
        self.flow.websocket.messages.append(message)
        await self.addon.websocket_message(self.flow)
        if self.flow.metadata.pop(ws_batch.DUE, False):  # as ws_batch's layer does once the read is handled
            await self.addon.durable_websocket_commit(self.flow)
            if self.flow.metadata.pop(ws_batch.REFUSED, False):
                message.drop()  # held back by the layer: it never reaches the agent
        return message

    async def close(self, by_client: bool = True, code: int = 1000) -> None:
        self.flow.websocket.closed_by_client, self.flow.websocket.close_code = by_client, code
        await self.addon.websocket_end(self.flow)


def events(n: int) -> list[str]:
    """The Responses API's answer to turn n, as ws_api sends it: three events, the last its end."""
    return [
        json.dumps({"type": "response.created", "n": n}),
        json.dumps({"type": "response.output_text.delta", "n": n}),
        json.dumps({"type": "response.completed", "n": n}),
    ]


def turn(n: int) -> str:
    return json.dumps({"type": "response.create", "model": "m", "input": f"turn {n}"})


def answer_of(body: bytes) -> list[str]:
    return [m["text"] for m in json.loads(body)["messages"]]


def run_scenario(scenario: Any) -> None:
    asyncio.run(scenario())


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait for what the sidecar's own upstream connection does in the background (the test's
    assertion after it says what was expected)."""
    for _ in range(int(timeout_s / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)


def test_a_live_conversation_journals_each_message_before_it_leaves_and_its_answer_at_its_end(
    pg_dsn: str, upstream: ws_api.Server, agent: list
) -> None:
    """The handshake is a step (GET, 101, its greeting its answer); each client message a WS step,
    pending before it leaves, completed at `response.completed` with the events that came."""
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            ws = Conversation(addon, run, "a1", upstream.port)
            assert await ws.open(greeting=['{"type": "hello"}']) == "recorded"
            assert sql(pg_dsn, "SELECT seq, method, state FROM durable_steps WHERE run_id = %s", run) == [
                (1, "GET", "completed")
            ]  # journaled before the greeting reached the agent
            first = await ws.client(turn(1))
            assert not first.dropped  # it leaves through mitmproxy's own connection
            rows = sql(pg_dsn, WS_STEPS, run)
            assert [r[:4] for r in rows] == [(1, "GET", "completed", 101), (2, "WS", "pending", None)]
            assert answer_of(rows[0][4]) == ['{"type": "hello"}']
            for event in events(1):
                assert not (await ws.server(event)).dropped  # each reaches the agent as it comes
            rows = sql(pg_dsn, WS_STEPS, run)
            assert rows[1][:4] == (2, "WS", "completed", 200) and answer_of(rows[1][4]) == events(1)
            await ws.close()
            assert agent == []  # nothing was injected: mitmproxy relayed all of it

    run_scenario(scenario)


async def record(addon: DurableSidecar, run: str, port: int, turns: int, path: str = "/v1/responses") -> None:
    """Attempt a1 of `run`: the handshake (with a greeting) and `turns` turns, each fully answered."""
    ws = Conversation(addon, run, "a1", port, path)
    await ws.open(greeting=['{"type": "hello"}'])
    for n in range(1, turns + 1):
        await ws.client(turn(n))
        for event in events(n):
            await ws.server(event)
    await ws.close()


async def resumed_after_turn_1(addon: DurableSidecar, run: str, port: int) -> Conversation:
    """Attempt a2 of a run whose a1 had one turn, that turn answered from the journal: the next
    turn goes live on the sidecar's own upstream."""
    await record(addon, run, port, turns=1)
    ws = Conversation(addon, run, "a2", port)
    await ws.open()
    await ws.client(turn(1))
    return ws


def test_a_resumed_conversation_is_answered_from_the_journal_then_goes_live_on_its_own_upstream(
    pg_dsn: str, upstream: ws_api.Server, agent: list
) -> None:
    """Attempt 2: the 101 is replayed with the accept for its own key and the greeting injected; the
    journaled turns are dropped and answered from the journal; the first new turn opens an upstream
    of the sidecar's own (ws_api books one connection, one call) and its events reach the agent and
    the journal."""
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            await record(addon, run, upstream.port, turns=2)
            ws_api.LEDGER.__init__()
            ws = Conversation(addon, run, "a2", upstream.port, key="x3JJHMbDL1EzLkh9GBhXDw==")
            assert await ws.open() == "replayed"
            assert ws.flow.response.status_code == 101
            assert ws.flow.response.headers["sec-websocket-accept"] == "HSmrc0sMlYUkAGmm5OPpG2HaGWk="  # RFC 6455's
            assert ws.flow.response.content == b"" and agent == [(b'{"type": "hello"}', True)]
            for n in (1, 2):
                agent.clear()
                message = await ws.client(turn(n))
                assert message.dropped  # never left
                assert agent == [(e.encode(), True) for e in events(n)]
            assert ws_api.LEDGER.books()["connections"] == 0
            agent.clear()
            live = await ws.client(turn(3))
            assert live.dropped  # mitmproxy has no upstream: the sidecar's own connection sent it
            await until(lambda: len(agent) == 4)
            assert [json.loads(content)["type"] for content, _ in agent] == [
                "response.created",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.completed",
            ]
            books = ws_api.LEDGER.books()
            assert (books["connections"], books["calls"], books["messages"]) == (1, 1, [turn(3)])
            rows = sql(pg_dsn, WS_STEPS, run)
            assert [r[:4] for r in rows][-1] == (4, "WS", "completed", 200)
            assert answer_of(rows[-1][4]) == [content.decode() for content, _ in agent]
            await ws.close()

    run_scenario(scenario)


def test_a_json_rpc_answer_ends_at_the_response_to_its_own_id_and_later_pushes_join_it(
    pg_dsn: str, upstream: ws_api.Server, agent: list
) -> None:
    """The answer to request 7 is not ended by a response to request 6 (another request's), only by
    its own; notifications after it are appended to that step at the next message, and replayed."""
    run = new_run()
    ask = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call"})
    other = json.dumps({"jsonrpc": "2.0", "id": 6, "result": {}})
    mine = json.dumps({"jsonrpc": "2.0", "id": 7, "result": {"ok": True}})
    push = json.dumps({"jsonrpc": "2.0", "method": "notifications/progress"})

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            ws = Conversation(addon, run, "a1", upstream.port, "/rpc")
            await ws.open()
            await ws.client(ask)
            await ws.server(other)
            assert sql(pg_dsn, WS_STEPS, run)[1][2] == "pending"
            await ws.server(mine)
            assert sql(pg_dsn, WS_STEPS, run)[1][2] == "completed"
            await ws.server(push)
            await ws.client("bye")  # the push joins step 2 before step 3 begins
            assert answer_of(sql(pg_dsn, WS_STEPS, run)[1][4]) == [other, mine, push]
            await ws.close(by_client=False, code=1000)  # the server's close ends the answer to "bye"
            assert [r[2] for r in sql(pg_dsn, WS_STEPS, run)] == ["completed"] * 3
            assert json.loads(sql(pg_dsn, WS_STEPS, run)[2][4])["closed"] == 1000  # replayed as the server's close

            again = Conversation(addon, run, "a2", upstream.port, "/rpc")
            await again.open()
            await again.client(ask)
            assert agent == [(other.encode(), True), (mine.encode(), True), (push.encode(), True)]

    run_scenario(scenario)


def test_an_agent_that_dies_mid_answer_leaves_its_step_in_doubt_and_a_clean_close_completes_it(
    pg_dsn: str, upstream: ws_api.Server, agent: list
) -> None:
    """A close with no close frame from the agent's side (1006) mid-answer: the answer is not
    journaled as complete (half an answer replayed would leave the agent waiting for its end). A
    close frame from the agent ends the answer in hand as complete."""
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            died = Conversation(addon, run, "a1", upstream.port)
            await died.open()
            await died.client(turn(1))
            await died.server(events(1)[0])
            await died.close(by_client=True, code=1006)
            assert [r[:4] for r in sql(pg_dsn, WS_STEPS, run)][1] == (2, "WS", "pending", None)

            closed = Conversation(addon, run, "b1", upstream.port, "/echo")
            await closed.open()
            await closed.client("ping 1")
            await closed.server("echo 1")
            await closed.close(by_client=True, code=1000)
            assert [r[2:4] for r in sql(pg_dsn, WS_STEPS, run)][-1] == ("completed", 200)
            assert json.loads(sql(pg_dsn, WS_STEPS, run)[-1][4])["closed"] is None  # the agent's own close

    run_scenario(scenario)


def test_binary_messages_are_journaled_in_base64_and_replayed_as_binary(
    pg_dsn: str, upstream: ws_api.Server, agent: list
) -> None:
    run = new_run()
    blob = bytes(range(256))

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            ws = Conversation(addon, run, "a1", upstream.port, "/echo")
            await ws.open()
            await ws.client(blob)
            await ws.server(blob[::-1])
            await ws.close()
            (message,) = json.loads(sql(pg_dsn, WS_STEPS, run)[1][4])["messages"]
            assert set(message) == {"at_ms", "binary"}
            again = Conversation(addon, run, "a2", upstream.port, "/echo")
            await again.open()
            assert (await again.client(blob)).dropped
            assert agent == [(blob[::-1], False)]

    run_scenario(scenario)


def test_a_message_the_journal_cannot_take_is_dropped_and_the_connection_closed(
    pg_dsn: str, upstream: ws_api.Server, agent: list, hung_up: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing unjournaled leaves: the journal refuses the message's step, so the message is dropped
    and the agent's connection closed (its retry finds the journal back)."""
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            ws = Conversation(addon, run, "a1", upstream.port)
            await ws.open()
            monkeypatch.setattr(addon.lifecycle.journal, "record", journal_down)
            message = await ws.client(turn(1))
            assert message.dropped and hung_up == [(4503, "connection lost")]
            assert [r[1] for r in sql(pg_dsn, WS_STEPS, run)] == ["GET"]

    run_scenario(scenario)


async def journal_down(*args: Any, **kwargs: Any) -> None:
    raise JournalError("connection lost")


def test_an_upstream_that_cannot_be_reached_after_a_replay_fails_the_new_turn_as_never_sent(
    pg_dsn: str, upstream: ws_api.Server, agent: list, hung_up: list
) -> None:
    """The journal answers the handshake; the new turn needs the upstream, which is gone: the turn
    was journaled before the attempt to send it and provably never left (no connection), so it is
    journaled failed, which the agent's retry may send again, and the agent's connection is closed."""
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            gone = ws_api.Server()  # an upstream of its own, stopped after attempt 1
            await record(addon, run, gone.port, turns=1)
            gone.stop()
            ws = Conversation(addon, run, "a2", gone.port)
            assert await ws.open() == "replayed"
            message = await ws.client(turn(2))
            assert message.dropped and [code for code, _ in hung_up] == [4502]
            assert "could not be reached" in hung_up[0][1]
            rows = sql(pg_dsn, WS_STEPS, run)
            assert [r[:4] for r in rows][-1] == (3, "WS", "failed", None)
            (error,) = sql(pg_dsn, "SELECT error FROM durable_steps WHERE run_id = %s AND seq = 3", run)[0]
            assert error.startswith("upstream WebSocket: ")  # why it failed, journaled with it

    run_scenario(scenario)


def test_the_upstream_closing_a_live_conversation_after_a_replay_completes_the_answer_in_hand(
    pg_dsn: str, upstream: ws_api.Server, agent: list, hung_up: list
) -> None:
    """/echo has no end marker: the answer to a message runs until the next message or the close.
    When the sidecar's own upstream closes, the answer in hand is journaled complete, with the close
    code, and the agent's connection is closed."""
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn, durable_ws_resume=["live"]) as addon:  # /echo keeps no state
            ws = Conversation(addon, run, "a1", upstream.port, "/echo")
            await ws.open()
            await ws.client("one")
            await ws.server("echo one")
            await ws.close()
            again = Conversation(addon, run, "a2", upstream.port, "/echo")
            await again.open()
            await again.client("one")
            await again.client("close")  # ws_api's /echo answers, then closes with 1000
            await until(lambda: bool(hung_up))
            assert hung_up == [(1000, "asked to")]  # the server's close reaches the agent as it was
            body = json.loads(sql(pg_dsn, WS_STEPS, run)[-1][4])
            assert (body["closed"], body["reason"]) == (1000, "asked to")
            assert sql(pg_dsn, WS_STEPS, run)[-1][2] == "completed"

    run_scenario(scenario)


def frame(content: bytes | str, text: bool = True, at_ms: float = 0.0) -> conversations.Frame:
    return conversations.Frame(at_ms, content.encode() if isinstance(content, str) else content, text)


@pytest.mark.parametrize("end", ["response.completed", "response.failed", "response.incomplete", "error"])
def test_each_responses_api_end_event_ends_an_answer(end: str) -> None:
    assert conversations.ends(b"", frame(json.dumps({"type": end})))
    assert not conversations.ends(b"", frame(json.dumps({"type": "response.output_text.delta"})))


def test_only_the_json_rpc_response_to_the_messages_own_id_ends_its_answer() -> None:
    asked = json.dumps({"jsonrpc": "2.0", "id": 3, "method": "tools/call"}).encode()
    assert conversations.ends(asked, frame('{"jsonrpc": "2.0", "id": 3, "result": {}}'))
    assert conversations.ends(asked, frame('{"jsonrpc": "2.0", "id": 3, "error": {"code": -1}}'))
    assert not conversations.ends(asked, frame('{"jsonrpc": "2.0", "id": 4, "result": {}}'))  # another's
    assert not conversations.ends(asked, frame('{"jsonrpc": "2.0", "id": 3, "method": "sampling"}'))  # a request
    assert not conversations.ends(asked, frame('{"jsonrpc": "2.0", "result": {}}'))  # no id
    assert not conversations.ends(b"not json", frame('{"jsonrpc": "2.0", "id": 3, "result": {}}'))
    assert not conversations.ends(b"[1]", frame('{"jsonrpc": "2.0", "id": 3, "result": {}}'))


def test_binary_frames_and_text_that_is_not_json_end_nothing() -> None:
    assert not conversations.ends(b"", frame(b'{"type": "response.completed"}', text=False))
    assert not conversations.ends(b"", frame('{"type": "response.completed"'))  # cut short: not JSON
    assert not conversations.ends(b"", frame("response.completed"))


def test_an_answer_is_journaled_as_readable_json_with_its_timing_to_a_tenth_of_a_millisecond() -> None:
    body = conversations.encode_answer(
        [frame("hé", at_ms=1.26), frame(b"\x00\xff", text=False, at_ms=2.34), frame(b"\xff bad", at_ms=0.0)],
        closed=conversations.Close(1001, "going away"),
    )
    assert json.loads(body) == {
        "messages": [
            {"at_ms": 1.3, "text": "hé"},
            {"at_ms": 2.3, "binary": "AP8="},
            {"at_ms": 0.0, "text": "\ufffd bad"},
        ],
        "closed": 1001,
        "reason": "going away",
    }
    assert conversations.decode_answer(body)[1] == frame(b"\x00\xff", text=False, at_ms=2.3)
    assert conversations.decode_close(body) == conversations.Close(1001, "going away")
    assert conversations.decode_answer(b"") == [] and conversations.decode_close(b"") is None


@pytest.mark.parametrize(
    ("code", "sent"), [(4001, 4001), (1000, 1000), (1005, 1000), (1006, 4502), (None, 4502), (1015, 4502)]
)
def test_a_servers_close_reaches_the_agent_as_a_close_frame_may_carry_it(code: int | None, sent: int) -> None:
    """1005, 1006 and 1015 may never be sent in a close frame (RFC 6455, 7.4.1)."""
    assert conversations.sendable(code, "r").code == sent
    assert ws_close.fit("é" * 100).encode().__len__() <= ws_close.REASON_MAX
    assert ws_close.code_for(409) == 4409 and ws_close.code_for(0) == 1011


def test_a_replayed_handshake_gets_the_framing_headers_and_its_greeting_leaves_the_body() -> None:
    flow = tflow.twebsocketflow(messages=False)
    flow.request.headers["sec-websocket-key"] = "dGhlIHNhbXBsZSBub25jZQ=="
    greeting = conversations.encode_answer([frame("hello")])
    flow.response = http.Response.make(101, greeting, {})
    assert conversations.replayed_handshake(flow) == [frame("hello")]
    headers = flow.response.headers
    assert flow.response.content == b"" and "content-length" not in headers
    assert (headers["connection"], headers["upgrade"]) == ("Upgrade", "websocket")
    assert headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455, 1.3
    flow.response = http.Response.make(101, b"", {})  # journaled with no body at all
    assert conversations.replayed_handshake(flow) == []
    flow.response = http.Response.make(403, b'{"messages": []}', {})  # refused: not a handshake
    assert conversations.replayed_handshake(flow) == [] and flow.response.content == b'{"messages": []}'


def test_a_message_is_journaled_as_a_request_to_its_connections_url_with_the_type_of_its_content(
    pg_dsn: str, upstream: ws_api.Server, agent: list
) -> None:
    run = new_run()
    query = (
        "SELECT url, request_headers, response_headers FROM durable_steps WHERE run_id = %s AND method = 'WS' "
        "ORDER BY seq"
    )

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            ws = Conversation(addon, run, "a1", upstream.port, "/echo?room=1")
            await ws.open()
            for message in (' {"a": 1}', "[1, 2]", "hello", b"\x00\x01"):
                await ws.client(message)
                await ws.server("ok")
            await ws.close()
            rows = sql(pg_dsn, query, run)
            assert {url for url, _, _ in rows} == {f"http://127.0.0.1:{upstream.port}/echo?room=1"}
            assert [dict(headers)["content-type"] for _, headers, _ in rows] == [
                "application/json; charset=utf-8",
                "application/json; charset=utf-8",
                "text/plain; charset=utf-8",
                "application/octet-stream",
            ]
            assert {dict(headers)["content-type"] for _, _, headers in rows} == {"application/x-durable-websocket+json"}

    run_scenario(scenario)


def test_each_server_message_is_journaled_with_the_milliseconds_since_its_client_message(
    pg_dsn: str, upstream: ws_api.Server, agent: list
) -> None:
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            ws = Conversation(addon, run, "a1", upstream.port, "/echo")
            await ws.open()
            await ws.client("one")
            await asyncio.sleep(0.05)
            await ws.server("echo one")
            await ws.close()
            (message,) = json.loads(sql(pg_dsn, WS_STEPS, run)[1][4])["messages"]
            assert 45 <= message["at_ms"] < 5000

    run_scenario(scenario)


def test_an_agent_that_dies_after_a_message_went_live_on_the_sidecars_upstream_leaves_it_in_doubt(
    pg_dsn: str, upstream: ws_api.Server, agent: list, caplog: pytest.LogCaptureFixture
) -> None:
    """After a replay the new turn leaves on the sidecar's own upstream connection: it may have been
    charged, so an agent that dies (1006) before its end leaves the step in doubt, not failed (a
    failed step would be sent again as if it never left)."""
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            ws = await resumed_after_turn_1(addon, run, upstream.port)
            slow = json.loads(turn(2)) | {"x_delay_ms": 3000}  # its end comes after the agent is gone
            await ws.client(json.dumps(slow))
            await until(lambda: bool(agent))
            await ws.close(by_client=True, code=1006)
            assert [r[:4] for r in sql(pg_dsn, WS_STEPS, run)][-1] == (3, "WS", "pending", None)
            assert "in doubt: the agent's connection died mid-answer" in caplog.text

    run_scenario(scenario)


def test_a_push_after_an_answer_reaches_the_agent_and_is_journaled_at_zero_ms(
    pg_dsn: str, upstream: ws_api.Server, agent: list, hung_up: list
) -> None:
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            ws = Conversation(addon, run, "a1", upstream.port)
            await ws.open()
            await ws.client(turn(1))
            for event in events(1):
                await ws.server(event)
            push = await ws.server('{"type": "rate_limits.updated"}')
            assert not push.dropped and hung_up == []
            await ws.close()
            messages = json.loads(sql(pg_dsn, WS_STEPS, run)[1][4])["messages"]
            assert messages[-1] == {"at_ms": 0.0, "text": '{"type": "rate_limits.updated"}'}

    run_scenario(scenario)


def test_a_greeting_that_looks_like_an_end_event_does_not_end_the_handshake(
    pg_dsn: str, upstream: ws_api.Server, agent: list
) -> None:
    """The handshake's answer runs to the first client message: an `error` event in the greeting is
    part of it, not its end; each greeting message is journaled before it is delivered."""
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            ws = Conversation(addon, run, "a1", upstream.port)
            await ws.open(greeting=['{"type": "error", "message": "rate limited"}', '{"type": "hello"}'])
            assert sql(pg_dsn, "SELECT state FROM durable_steps WHERE run_id = %s", run) == [("completed",)]
            assert answer_of(sql(pg_dsn, WS_STEPS, run)[0][4]) == [
                '{"type": "error", "message": "rate limited"}',
                '{"type": "hello"}',
            ]

    run_scenario(scenario)


def test_an_answer_the_journal_cannot_take_yet_is_held_and_its_end_still_reaches_the_agent(
    pg_dsn: str, upstream: ws_api.Server, agent: list, hung_up: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal fails the end's commit (the link dropped): the sidecar holds the answer and
    journals it once it can, so the end event goes on to the agent; a step the journal says is no
    longer this sidecar's (NotOurs) is not the agent's to have: its end is dropped, the connection closed."""
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            ws = Conversation(addon, run, "a1", upstream.port)
            await ws.open()
            await ws.client(turn(1))
            await ws.server(events(1)[0])
            monkeypatch.setattr(addon.lifecycle.journal, "complete", journal_down)
            end = await ws.server(events(1)[-1])
            assert not end.dropped and hung_up == []

            other = Conversation(addon, run, "b1", upstream.port, "/echo")
            await other.open()
            await other.client(turn(1))
            monkeypatch.setattr(addon.lifecycle.journal, "complete", not_ours)
            end = await other.server(events(1)[-1])
            assert end.dropped and [code for code, _ in hung_up] == [4503]

    run_scenario(scenario)


async def not_ours(*args: Any, **kwargs: Any) -> None:
    raise NotOurs("taken over meanwhile")


def test_each_message_step_is_logged_once_and_the_handshake_once(
    pg_dsn: str, upstream: ws_api.Server, agent: list, caplog: pytest.LogCaptureFixture
) -> None:
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            caplog.set_level("INFO", logger="durable")
            await record(addon, run, upstream.port, turns=2)
            lines = [r.getMessage() for r in caplog.records if f"durable run={run}" in r.getMessage()]
            assert [line.split(" method=")[1].split(" ")[0] for line in lines] == ["GET", "WS", "WS"]

    run_scenario(scenario)


def test_a_turn_journaled_with_no_answer_at_all_replays_as_no_messages(
    pg_dsn: str, upstream: ws_api.Server, agent: list, hung_up: list
) -> None:
    """An operator's `durable resolve --complete-from` an empty file: the turn is answered with nothing."""
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            await record(addon, run, upstream.port, turns=1)
            sql(pg_dsn, "UPDATE durable_steps SET response_body = '' WHERE run_id = %s AND seq = 2", run)
            ws = Conversation(addon, run, "a2", upstream.port)
            await ws.open()
            agent.clear()
            assert (await ws.client(turn(1))).dropped and agent == [] and hung_up == []

    run_scenario(scenario)


REPLAYED = [ws_resume.Replayed(b"add 1", True, 1, False)]


@pytest.mark.parametrize(
    ("policy", "replayed", "message", "action"),
    [
        ("auto", [], b"add 3", "live"),  # only the handshake replayed: a new connection is what the agent had
        ("auto", REPLAYED, b"add 3", "close"),
        ("auto", REPLAYED, b'{"type": "response.create", "input": "hi"}', "live"),
        ("auto", REPLAYED, b'{"type": "response.create", "previous_response_id": "r1"}', "live"),
        ("auto", REPLAYED, b'{"type": "response.create", "previous_response_id": "r1", "store": false}', "close"),
        ("auto", REPLAYED, b'{"type": "response.create", "response": {"modalities": ["text"]}}', "close"),  # Realtime
        ("auto", REPLAYED, b'{"jsonrpc": "2.0", "id": 3, "method": "add"}', "close"),
        ("auto", REPLAYED, b"{not json", "close"),
        ("live", REPLAYED, b"add 3", "live"),
        ("close", REPLAYED, b'{"type": "response.create", "input": "hi"}', "close"),
        ("resend", REPLAYED, b"add 3", "resend"),
        ("resend", [], b"add 3", "live"),
    ],
)
def test_what_a_resumed_conversation_does_when_it_must_go_live(
    policy: str, replayed: list, message: bytes, action: str
) -> None:
    assert ws_resume.decide(policy, replayed, message) == action


def test_the_ws_resume_policy_is_per_host_and_a_bad_one_is_refused() -> None:
    from types import SimpleNamespace

    from mitmproxy import exceptions

    from durable_sidecar.steps import settings

    options = {name: default for name, _, default, _ in settings.OPTIONS}
    chosen = settings.from_options(SimpleNamespace(**options | {"durable_ws_resume": ["api.x=resend", "live"]}))
    assert (chosen.ws_resume_policy("API.X"), chosen.ws_resume_policy("other")) == ("resend", "live")
    assert settings.DEFAULTS.ws_resume_policy("any") == "auto"
    with pytest.raises(exceptions.OptionsError, match="durable_ws_resume"):
        settings.from_options(SimpleNamespace(**options | {"durable_ws_resume": ["replay"]}))


def test_after_going_live_an_end_reaches_the_agent_only_once_journaled(
    pg_dsn: str, upstream: ws_api.Server, agent: list, hung_up: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the sidecar's own upstream (after a replay), the event that ends an answer is journaled
    before it is injected: when the journal refuses it (the step is no longer this sidecar's), the
    agent never gets it and its connection is closed; the events before it came live, as a stream's do."""
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            ws = await resumed_after_turn_1(addon, run, upstream.port)
            agent.clear()
            monkeypatch.setattr(addon.lifecycle.journal, "complete", not_ours)
            await ws.client(turn(2))
            await until(lambda: bool(hung_up))
            assert [json.loads(content)["type"] for content, _ in agent] == [
                "response.created",
                "response.output_text.delta",
                "response.output_text.delta",
            ]  # not response.completed: the journal never took it
            assert [code for code, _ in hung_up] == [4503]

    run_scenario(scenario)


def test_a_chatty_answer_with_no_end_marker_costs_bounded_writes_then_streams_in_doubt(
    pg_dsn: str, upstream: ws_api.Server, agent: list, hung_up: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each message of an answer with no end marker is journaled (the answer rewritten whole) before
    it is delivered; past REWRITE_BUDGET bytes written for one answer the step is taken back into
    doubt and the rest streams through: the writes stay bounded, nothing is refused."""
    monkeypatch.setattr(conversations, "REWRITE_BUDGET", 1000)
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            ws = Conversation(addon, run, "a1", upstream.port, "/echo")
            await ws.open()
            await ws.client("stream")
            writes = []
            journal = addon.lifecycle.journal
            original = journal.append_answer
            monkeypatch.setattr(journal, "append_answer", lambda *a: writes.append(a) or original(*a))
            sent = [await ws.server("x" * 100) for _ in range(20)]
            assert not any(m.dropped for m in sent) and hung_up == []  # all delivered, none refused
            assert len(writes) < 5  # 100, 200, 300... bytes rewritten: the budget of 1000 is spent by the 4th
            assert sql(pg_dsn, "SELECT state FROM durable_steps WHERE run_id = %s AND method = 'WS'", run) == [
                ("pending",)]  # in doubt, as a too-big answer is

    run_scenario(scenario)


def test_offline_a_message_the_journal_lacks_is_never_sent_and_closes_with_4404(
    pg_dsn: str, upstream: ws_api.Server, agent: list, hung_up: list
) -> None:
    """durable_offline (durable test): turn 1 replays; turn 2 matches nothing, so it is dropped (no
    upstream connection is opened, nothing charged), journaled as never sent, and the agent's
    connection closes with 4404 (4000 + the 404 an HTTP call gets)."""
    run = new_run()

    async def scenario() -> None:
        async with sidecar(pg_dsn) as addon:
            await record(addon, run, upstream.port, turns=1)
        ws_api.LEDGER.__init__()
        async with sidecar(pg_dsn, durable_offline=True) as addon:
            ws = Conversation(addon, run, "a2", upstream.port)
            assert await ws.open() == "replayed"
            assert (await ws.client(turn(1))).dropped
            assert (await ws.client(turn(2))).dropped
            assert [code for code, _ in hung_up] == [4404] and ws_api.LEDGER.books()["connections"] == 0
            assert sql(pg_dsn, "SELECT state, error FROM durable_steps WHERE run_id = %s ORDER BY seq DESC LIMIT 1",
                       run) == [("failed", "not in the recording (durable_offline): never forwarded")]

    run_scenario(scenario)
