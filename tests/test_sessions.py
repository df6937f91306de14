"""Upstream sessions across a resume (proxy/sessions.py), as pure logic: which replayed tokens are
remembered, when a session is reopened and with what, and how tokens are swapped each way. The
upstream's side is replaced by a recorder of what would be sent; tests/test_mcp.py drives the whole
thing through a live sidecar and a restarted MCP server."""

from __future__ import annotations

import asyncio
import json

import pytest
from mitmproxy.test import tflow, tutils

from durable_sidecar.proxy import sessions
from durable_sidecar.proxy.sessions import HEADER, Sessions


def handed_out(token: str, asked: str | None = None) -> tflow.HTTPFlow:
    """A replayed answer to an `initialize` that hands out `token` (the request carried `asked`)."""
    flow = tflow.tflow(resp=tutils.tresp(headers=[(HEADER.encode(), token.encode())]))
    flow.request.content = b'{"jsonrpc": "2.0", "id": 1, "method": "initialize"}'
    if asked is not None:
        flow.request.headers[HEADER] = asked
    return flow


def later(token: str | None) -> tflow.HTTPFlow:
    """A later request of the agent, carrying `token` (or none)."""
    flow = tflow.tflow()
    flow.request.headers["authorization"] = "Bearer live"
    flow.request.headers["proxy-authorization"] = "Basic cnVuOmE="
    for name in ("host", "connection", "transfer-encoding"):  # the connection's own: not the session's
        flow.request.headers[name] = "x"
    if token is not None:
        flow.request.headers[HEADER] = token
    return flow


@pytest.fixture
def upstream(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, str], bytes]]:
    """What `reopen` sends upstream, in order; each POST's answer carries the session "live-N". The
    session check (a ping) is answered 404: the upstream no longer knows the replayed session."""
    sent: list[tuple[str, dict[str, str], bytes]] = []

    def post(url: str, headers: dict[str, str], body: bytes) -> tuple[int, str | None]:
        if body == sessions.PING:
            return 404, None
        sent.append((url, headers, body))
        return 200, f"live-{len(sent)}"

    monkeypatch.setattr(sessions, "_post", post)
    return sent


@pytest.mark.parametrize("status", [200, 202, 401, 500])
def test_a_replayed_session_the_upstream_still_knows_is_used_as_it_is(
    monkeypatch: pytest.MonkeyPatch, status: int
) -> None:
    """Only a 404 to the session check (MCP's ping, under the replayed token, with the live request's
    credentials) says the session is gone: anything else keeps it, and nothing is reopened."""
    checks: list[tuple[dict[str, str], bytes]] = []
    monkeypatch.setattr(sessions, "_post", lambda url, headers, body: checks.append((headers, body)) or (status, None))
    kept = Sessions()
    kept.replayed("run", handed_out("old"))
    for _ in range(2):
        request = later("old").request
        assert asyncio.run(kept.outgoing("run", request)) is None
        assert request.headers[HEADER] == "old"
    assert checks == [({"header": "qvalue", "authorization": "Bearer live", HEADER: "old"}, sessions.PING)]  # once
    assert json.loads(sessions.PING)["method"] == "ping"


def test_only_a_token_the_answer_hands_out_is_remembered() -> None:
    kept = Sessions()
    kept.replayed("run", handed_out("old"))
    kept.replayed("run", handed_out("same", asked="same"))  # the agent already had it: nothing new
    no_answer = handed_out("x")
    no_answer.response = None
    kept.replayed("run", no_answer)
    assert list(kept.origins) == [("run", "old")]
    assert kept.origins[("run", "old")].new is None  # not reopened until a request uses it


def test_remembered_tokens_are_bounded_least_recently_handed_out_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "KEPT", 3)
    kept = Sessions()
    for token in ("a", "b", "c"):
        kept.replayed("run", handed_out(token))
    kept.replayed("run", handed_out("a"))  # handed out again: the most recent now
    kept.replayed("run", handed_out("d"))
    assert list(kept.origins) == [("run", "c"), ("run", "a"), ("run", "d")]


def test_a_replayed_token_opens_one_new_session_with_the_agents_handshake(upstream: list) -> None:
    kept = Sessions()
    kept.replayed("run", handed_out("old"))

    async def three_requests() -> list[tuple[str, str] | None]:
        requests = [later("old").request for _ in range(3)]
        mapped = await asyncio.gather(*(kept.outgoing("run", r) for r in requests))
        assert all(r.headers[HEADER] == "live-1" for r in requests)
        return list(mapped)

    assert asyncio.run(three_requests()) == [("old", "live-1")] * 3
    (url, headers, body), (_, notified_headers, notified) = upstream  # one initialize, one notification
    assert body == b'{"jsonrpc": "2.0", "id": 1, "method": "initialize"}' and url == later(None).request.url
    live = {"header": "qvalue", "authorization": "Bearer live"}  # the agent's own headers, with its live credentials
    assert headers == live  # none of the connection's, the proxy's, or the old token
    assert notified_headers == live | {HEADER: "live-1"}
    assert json.loads(notified) == {"jsonrpc": "2.0", "method": "notifications/initialized"}


def test_requests_without_a_replayed_token_go_as_they_are(upstream: list) -> None:
    kept = Sessions()
    kept.replayed("run", handed_out("old"))
    for run, token in (("run", None), ("run", "unknown"), ("other run", "old")):
        request = later(token).request
        assert asyncio.run(kept.outgoing(run, request)) is None
        assert request.headers.get(HEADER) == token
    assert upstream == []


def test_a_session_that_cannot_be_reopened_sends_the_old_token(monkeypatch: pytest.MonkeyPatch) -> None:
    # the session is gone, and the answer to initialize carries no session header
    monkeypatch.setattr(sessions, "_post", lambda url, headers, body: (404 if body == sessions.PING else 200, None))
    kept = Sessions()
    kept.replayed("run", handed_out("old"))
    request = later("old").request
    assert asyncio.run(kept.outgoing("run", request)) is None
    assert request.headers[HEADER] == "old" and kept.origins[("run", "old")].new is None


def test_the_live_token_goes_back_to_the_agent_as_the_one_it_knows() -> None:
    answer = tutils.tresp(headers=[(HEADER.encode(), b"live-1")])
    Sessions.incoming(answer, ("old", "live-1"))
    assert answer.headers[HEADER] == "old"
    other = tutils.tresp(headers=[(HEADER.encode(), b"someone else's")])
    Sessions.incoming(other, ("old", "live-1"))
    assert other.headers[HEADER] == "someone else's"
