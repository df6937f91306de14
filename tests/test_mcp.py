"""MCP over Streamable HTTP through the sidecar (against the paid API's MCP-style server): a tool
call's answer is complete at its JSON-RPC response, the session's notification stream is not a step,
and a session that is gone (404) is never journaled as a call's answer."""

from __future__ import annotations

import json
import time

import requests

from conftest import PaidApi, Sidecars, new_run, sql


def rpc(sidecar, api: PaidApi, run: str, attempt: str, method: str, rpc_id: int, session: str | None = None,
        params: dict | None = None):
    """What an MCP client does: POST, read the event stream up to the response to its id, hang up."""
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    if session:
        headers["Mcp-Session-Id"] = session
    body = {"jsonrpc": "2.0", "id": rpc_id, "method": method, "params": params or {}}
    r = requests.post(f"{api.url}/mcp", json=body,
                      headers=headers, stream=True, timeout=30, proxies={"http": sidecar.proxy_url(run, attempt)})
    if r.status_code != 200:
        return r, None
    for line in r.iter_lines():
        if line.startswith(b"data:"):
            doc = json.loads(line[5:])
            if doc.get("id") == rpc_id:
                r.close()  # the client stops reading here; the server keeps the stream open
                return r, doc
    return r, None


def test_a_tool_call_is_complete_at_its_response_and_the_notification_stream_is_no_step(
    sidecars: Sidecars, http_api: PaidApi, pg_dsn: str
) -> None:
    sidecar = sidecars.start()
    run = new_run()
    init, _ = rpc(sidecar, http_api, run, "a1", "initialize", 1)
    session = init.headers["Mcp-Session-Id"]
    notifications = requests.get(f"{http_api.url}/mcp", headers={"Accept": "text/event-stream", "Mcp-Session-Id": session},
                                 stream=True, timeout=30, proxies={"http": sidecar.proxy_url(run, "a1")})
    assert notifications.headers["Durable-Outcome"] == "passthrough"
    notifications.close()
    call, answer = rpc(sidecar, http_api, run, "a1", "tools/call", 2, session)
    assert answer is not None and call.headers["Durable-Outcome"] == "recorded"
    time.sleep(0.5)  # well before the server ends its stream (1.5 s)
    states = sql(pg_dsn, "SELECT seq, state FROM durable_steps WHERE run_id = %s ORDER BY seq", run)
    assert states == [(1, "completed"), (2, "completed")]  # journaled at the response, not held as an orphan
    assert "orphan" not in sidecar.log()
    again, replayed = rpc(sidecar, http_api, run, "a2", "tools/call", 2, session)
    assert again.headers["Durable-Outcome"] == "replayed" and replayed == answer


def test_a_404_for_a_gone_session_is_not_journaled_as_the_answer(sidecars: Sidecars, http_api: PaidApi, pg_dsn: str) -> None:
    sidecar = sidecars.start()
    run = new_run()
    init, _ = rpc(sidecar, http_api, run, "a1", "initialize", 1)
    requests.post(f"{http_api.url}/_mcp_restart", timeout=10)  # the MCP server is redeployed
    gone, _ = rpc(sidecar, http_api, run, "a1", "tools/call", 2, init.headers["Mcp-Session-Id"])
    assert gone.status_code == 404
    assert sql(pg_dsn, "SELECT state FROM durable_steps WHERE run_id = %s AND seq = 2", run) == [("failed",)]


def test_a_replayed_session_is_reopened_upstream_after_a_redeploy(
    sidecars: Sidecars, http_api: PaidApi, pg_dsn: str
) -> None:
    """The agent resumes after the MCP server was redeployed: its replayed `initialize` hands it the
    old session id, which the server no longer knows. Its first live call (and its notification
    stream) reach the server under a session the sidecar opened with the agent's own initialize;
    the agent keeps seeing the old id, and the call is charged once."""
    sidecar = sidecars.start()
    run = new_run()
    init, _ = rpc(sidecar, http_api, run, "a1", "initialize", 1)
    old = init.headers["Mcp-Session-Id"]
    _, first = rpc(sidecar, http_api, run, "a1", "tools/call", 2, old)
    requests.post(f"{http_api.url}/_mcp_restart", timeout=10)  # the agent crashed; the server is redeployed
    again, _ = rpc(sidecar, http_api, run, "a2", "initialize", 1)
    assert again.headers["Durable-Outcome"] == "replayed" and again.headers["Mcp-Session-Id"] == old
    _, replayed = rpc(sidecar, http_api, run, "a2", "tools/call", 2, old)
    assert replayed == first
    live, answer = rpc(sidecar, http_api, run, "a2", "tools/call", 3, old)
    assert live.status_code == 200 and live.headers["Durable-Outcome"] == "recorded", live.text
    assert answer is not None and "result" in answer
    assert live.headers["Mcp-Session-Id"] == old  # the agent's id, though the server gave a new one
    stream = requests.get(f"{http_api.url}/mcp", headers={"Accept": "text/event-stream", "Mcp-Session-Id": old},
                          stream=True, timeout=30, proxies={"http": sidecar.proxy_url(run, "a2")})
    assert stream.status_code == 200
    stream.close()
    assert http_api.books()["charges"] == 2  # tool calls 2 and 3, each once
    states = sql(pg_dsn, "SELECT seq, state FROM durable_steps WHERE run_id = %s ORDER BY seq", run)
    assert states == [(1, "completed"), (2, "completed"), (3, "completed")]


def cart_of(answer: dict) -> list[str]:
    return json.loads(answer["result"]["content"][0]["text"])["cart"]


def test_a_replayed_session_the_server_still_holds_keeps_its_state(
    sidecars: Sidecars, http_api: PaidApi, pg_dsn: str
) -> None:
    """The agent fills a cart in an MCP session and crashes; the server keeps running. On resume
    the replayed `initialize` hands the agent the old session id, the cart calls replay, and the
    live checkout reaches the server under that same session: it sees the cart (a reopened session
    would check out an empty one), and each call is charged once."""
    sidecar = sidecars.start()
    run = new_run()
    init, _ = rpc(sidecar, http_api, run, "a1", "initialize", 1)
    session = init.headers["Mcp-Session-Id"]
    for n, item in ((2, "apple"), (3, "pear")):
        rpc(sidecar, http_api, run, "a1", "tools/call", n, session, {"name": "add_to_cart", "arguments": {"item": item}})
    again, _ = rpc(sidecar, http_api, run, "a2", "initialize", 1)
    assert again.headers["Durable-Outcome"] == "replayed" and again.headers["Mcp-Session-Id"] == session
    for n, item in ((2, "apple"), (3, "pear")):
        replayed, _ = rpc(sidecar, http_api, run, "a2", "tools/call", n, session,
                          {"name": "add_to_cart", "arguments": {"item": item}})
        assert replayed.headers["Durable-Outcome"] == "replayed"
    live, checkout = rpc(sidecar, http_api, run, "a2", "tools/call", 4, session, {"name": "checkout"})
    assert live.headers["Durable-Outcome"] == "recorded" and live.headers["Mcp-Session-Id"] == session
    assert checkout is not None and cart_of(checkout) == ["apple", "pear"]
    assert http_api.books()["charges"] == 3  # two cart calls and the checkout, each once
    assert "still known upstream" in sidecar.log() and "reopened" not in sidecar.log()


def test_a_reopened_session_sends_the_agents_credentials_and_no_hop_by_hop_header(mocker) -> None:
    """The sidecar's own initialize carries the live request's headers (its credentials), never the
    old session id, the proxy's credentials or the framing of the agent's request."""
    import asyncio

    from mitmproxy.test import tutils

    from durable_sidecar.proxy import sessions

    post = mocker.patch.object(sessions, "_post", return_value=(200, "sess-new"))
    initialize = tutils.treq(method=b"POST", content=b'{"method": "initialize"}')
    current = tutils.treq(method=b"POST", content=b'{"method": "tools/call"}')
    current.headers.clear()
    for name, value in [("Host", "mcp.example"), ("Authorization", "Bearer live"), ("Mcp-Session-Id", "sess-old"),
                        ("Transfer-Encoding", "chunked"), ("Connection", "keep-alive"),
                        ("Proxy-Authorization", "Basic cnVuOmE="), ("Content-Length", "24")]:
        current.headers.add(name, value)
    assert asyncio.run(sessions.reopen(initialize, current)) == "sess-new"
    (url, headers, body), (_, then, _) = (c.args for c in post.call_args_list)
    assert body == b'{"method": "initialize"}' and headers == {"Authorization": "Bearer live"}
    assert then == {"Authorization": "Bearer live", "mcp-session-id": "sess-new"}
