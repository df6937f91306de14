"""WebSocket conversations: every client message a step, the server messages after it its answer;
on resume answered from the journal with no upstream connection, live again from the first message
the journal does not know (scripts/ws_api.py is the upstream; its ledger is the judge)."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from conftest import PaidApi, Sidecars, eventually, new_run, sql

from durable_sidecar.tools import launcher

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
import ws_api  # noqa: E402


@pytest.fixture(scope="module")
def wss_api(_https_api: PaidApi) -> Iterator[ws_api.Server]:
    server = ws_api.Server(tls_dir=_https_api.ca.parent)  # the CA the sidecars trust
    yield server
    server.stop()


@pytest.fixture
def api(wss_api: ws_api.Server) -> ws_api.Server:
    ws_api.LEDGER.__init__()
    return wss_api


def converse(url: str, sidecar, attempt: str, run: str, ca_bundle: Path, messages: list[str],
             read: int | None = None) -> list[list[str]]:
    """Send each message and read its answer: up to its end marker (Responses API, JSON-RPC) or
    `read` messages; returns the answers. A handshake with no answer prints the sidecar's log.
    The asyncio client: websockets.sync loses its opening request on about 1 in 150 fresh TLS
    connections here, with no proxy in between (docs/development.md)."""
    try:
        return asyncio.run(_converse(url, sidecar.proxy_url(run, attempt), ca_bundle, messages, read))
    except TimeoutError:
        print("sidecar log:", sidecar.log()[-6000:])
        raise


async def _converse(url: str, proxy: str, ca_bundle: Path, messages: list[str], read: int | None) -> list[list[str]]:
    context = ssl.create_default_context(cafile=str(ca_bundle))
    answers = []
    async with connect(url, proxy=proxy, ssl=context if url.startswith("wss") else None, open_timeout=20) as ws:
        for message in messages:
            await ws.send(message)
            answer: list[str] = []
            while True:
                frame = str(await asyncio.wait_for(ws.recv(), 20))
                answer.append(frame)
                doc = json.loads(frame) if frame.startswith("{") else {}
                if doc.get("type") == "response.completed" or "result" in doc or len(answer) == read:
                    break
            answers.append(answer)
    return answers


def turn(n: int) -> str:
    return json.dumps({"type": "response.create", "model": "m", "input": f"turn {n}"})


def test_a_resumed_conversation_is_answered_from_the_journal_then_goes_live(
    sidecars: Sidecars, api: ws_api.Server, ca_bundle: Path, pg_dsn: str
) -> None:
    """Attempt 1 has two turns answered; attempt 2 repeats them and asks a third. The two are
    answered from the journal without an upstream connection, byte for byte; the third opens one."""
    sidecar = sidecars.start()
    run = new_run()
    url = f"{api.url}/v1/responses"
    first = converse(url, sidecar, "a1", run, ca_bundle, [turn(1), turn(2)])
    assert ws_api.LEDGER.books()["calls"] == 2 and ws_api.LEDGER.books()["connections"] == 1
    second = converse(url, sidecar, "a2", run, ca_bundle, [turn(1), turn(2), turn(3)])
    assert second[:2] == first  # the same events, in order, byte for byte
    books = ws_api.LEDGER.books()
    assert books["calls"] == 3 and books["messages"][-1] == turn(3)  # nothing charged twice
    assert books["connections"] == 2  # attempt 2 connected upstream only to go live
    assert "answer 3 to" in second[2][-1]
    query = "SELECT method, status, state, last_outcome FROM durable_steps WHERE run_id = %s ORDER BY seq"
    expected = [("GET", 101, "completed", "replayed"), ("WS", 200, "completed", "replayed"),
                ("WS", 200, "completed", "replayed"), ("WS", 200, "completed", "recorded")]
    assert eventually(lambda: sql(pg_dsn, query, run), expected) == expected  # replays are noted in batches


def test_json_rpc_and_pushes_replay_and_nothing_leaves_unjournaled(
    sidecars: Sidecars, api: ws_api.Server, ca_bundle: Path, pg_dsn: str
) -> None:
    """A greeting pushed on connect and JSON-RPC answers (end: the response to the request's id)
    replay with no upstream connection at all when the whole conversation is journaled."""
    sidecar = sidecars.start()
    run = new_run()
    calls = [json.dumps({"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {"n": i}}) for i in (1, 2)]
    first = converse(f"{api.url}/rpc", sidecar, "a1", run, ca_bundle, calls)
    again = converse(f"{api.url}/rpc", sidecar, "a2", run, ca_bundle, calls)
    assert again == first and ws_api.LEDGER.books() | {"messages": []} == {"connections": 1, "calls": 2,
                                                                              "messages": []}
    greeted = converse(f"{api.url}/greet", sidecar, "a1", run, ca_bundle, ["hi"], read=2)
    replayed = converse(f"{api.url}/greet", sidecar, "a3", run, ca_bundle, ["hi"], read=2)
    assert json.loads(greeted[0][0])["type"] == "hello" and replayed == greeted
    assert ws_api.LEDGER.books()["connections"] == 2  # the replayed greeting and echo: no upstream


def test_an_agent_killed_mid_conversation_resumes_without_a_second_charge(
    sidecars: Sidecars, api: ws_api.Server, ca_bundle: Path, pg_dsn: str, tmp_path: Path
) -> None:
    """The agent (a process) gets two answers and is SIGKILLed; its restart replays both and the
    third turn is the only new charge."""
    sidecar = sidecars.start()
    run = new_run()
    url = f"{api.url}/v1/responses"
    killed = agent(tmp_path, url, sidecar.proxy_url(run, "a1"), ca_bundle, "2")
    assert killed.returncode == -9, killed.stderr
    done = agent(tmp_path, url, sidecar.proxy_url(run, "a2"), ca_bundle, "0")
    assert done.returncode == 0, done.stderr + sidecar.log()[-2000:]
    assert killed.stdout.splitlines() == done.stdout.splitlines()[:2]
    assert ws_api.LEDGER.books()["calls"] == 3
    rows = sql(pg_dsn, "SELECT count(*) FROM durable_steps WHERE run_id = %s AND state <> 'completed'", run)
    assert rows == [(0,)]


def agent(tmp_path: Path, url: str, proxy: str, bundle: Path, *args: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "agent.py"
    script.write_text(AGENT)
    return subprocess.run([sys.executable, str(script), url, proxy, str(bundle), *args], capture_output=True,
                          text=True, timeout=90)


def test_an_agent_killed_mid_answer_leaves_the_step_in_doubt_never_half_answered(
    sidecars: Sidecars, api: ws_api.Server, ca_bundle: Path, pg_dsn: str, tmp_path: Path
) -> None:
    """Killed after the first event of turn 2's answer: that answer is not journaled as complete
    (a replay of half an answer would leave the agent waiting for its end); the restart re-sends
    turn 2 (the step is in doubt, and a WebSocket message carries no idempotency key) and the
    run finishes with every step complete."""
    sidecar = sidecars.start()
    run = new_run()
    url = f"{api.url}/v1/responses"
    killed = agent(tmp_path, url, sidecar.proxy_url(run, "a1"), ca_bundle, "2", "mid")
    assert killed.returncode == -9, killed.stderr
    in_doubt = "SELECT seq, state FROM durable_steps WHERE run_id = %s AND method = 'WS' ORDER BY seq"
    assert eventually(lambda: sql(pg_dsn, in_doubt, run), [(2, "completed"), (3, "pending")]) == [
        (2, "completed"), (3, "pending")]
    done = agent(tmp_path, url, sidecar.proxy_url(run, "a2"), ca_bundle, "0")
    assert done.returncode == 0, done.stderr + sidecar.log()[-2000:]
    assert [line.split(" to ")[0] for line in done.stdout.splitlines()] == ["answer 1", "answer 3", "answer 4"]
    assert ws_api.LEDGER.books()["calls"] == 4  # turn 2 twice: sent, in doubt, re-sent
    assert sql(pg_dsn, "SELECT count(*) FROM durable_steps WHERE run_id = %s AND state <> 'completed'", run) == [(0,)]


def test_a_sidecar_killed_mid_conversation_leaves_nothing_wedged(
    sidecars: Sidecars, api: ws_api.Server, ca_bundle: Path, pg_dsn: str, tmp_path: Path
) -> None:
    """SIGKILL the sidecar while turn 2's answer is on its way: a new sidecar on the same journal
    replays the handshake and turn 1, takes over turn 2 (in doubt) once its lease has lapsed and
    re-sends it live, and the run completes."""
    sidecar = sidecars.start()
    run = new_run()
    url = f"{api.url}/v1/responses"
    script = tmp_path / "agent.py"
    script.write_text(AGENT)
    proc = subprocess.Popen([sys.executable, str(script), url, sidecar.proxy_url(run, "a1"), str(ca_bundle), "2", "mid"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    eventually(lambda: ws_api.LEDGER.books()["calls"], 2)
    sidecar.kill()
    proc.wait(timeout=30)
    restarted = sidecars.start()
    done = agent(tmp_path, url, restarted.proxy_url(run, "a2"), ca_bundle, "0")
    assert done.returncode == 0, done.stderr + restarted.log()[-2000:]
    assert [line.split(" to ")[0] for line in done.stdout.splitlines()] == ["answer 1", "answer 3", "answer 4"]
    assert sql(pg_dsn, "SELECT count(*) FROM durable_steps WHERE run_id = %s AND state <> 'completed'", run) == [(0,)]


def closed_with(url: str, proxy: str, ca_bundle: Path, messages: list[str]) -> tuple[list[str], int | None, str, float]:
    """Send the messages, then read until the connection closes: what came, the close code and
    reason the agent got, and how long the close took after the last message (a hung connection
    fails the read after 20 s)."""

    async def talk() -> tuple[list[str], int | None, str, float]:
        context = ssl.create_default_context(cafile=str(ca_bundle))
        got: list[str] = []
        async with connect(url, proxy=proxy, ssl=context if url.startswith("wss") else None, open_timeout=20) as ws:
            for message in messages:
                await ws.send(message)
            sent = time.monotonic()
            try:
                while True:
                    got.append(str(await asyncio.wait_for(ws.recv(), 20)))
            except ConnectionClosed:
                pass
            frame = ws.protocol.close_rcvd
            return got, frame.code if frame else None, frame.reason if frame else "", time.monotonic() - sent

    return asyncio.run(talk())


def test_a_refused_message_closes_the_agents_connection_at_once_with_a_code_that_says_why(
    sidecars: Sidecars, api: ws_api.Server, ca_bundle: Path, tmp_path: Path
) -> None:
    """Turn 2 is in doubt (the agent was killed mid-answer) and the host's policy is `fail`: the
    resumed agent's turn 2 is refused and its connection closed within seconds, with 4409 (4000 +
    the HTTP refusal's 409) and the reason, not left open until the agent's own timeout."""
    run = new_run()
    url = f"{api.url}/v1/responses"
    killed = agent(tmp_path, url, sidecars.start().proxy_url(run, "a1"), ca_bundle, "2", "mid")
    assert killed.returncode == -9, killed.stderr
    strict = sidecars.start(durable_in_doubt="127.0.0.1=fail")
    eventually(lambda: ws_api.LEDGER.books()["calls"], 2)
    slow_turn_2 = json.dumps(json.loads(turn(2)) | {"x_delay_ms": 1000})  # as AGENT sends it
    got, code, reason, waited = closed_with(url, strict.proxy_url(run, "a2"), ca_bundle, [turn(1), slow_turn_2])
    assert code == 4409 and "in doubt" in reason and waited < 5, (code, reason, waited)
    assert json.loads(got[-1])["type"] == "response.completed" and ws_api.LEDGER.books()["calls"] == 2


def test_a_resumed_conversation_whose_server_is_gone_is_closed_with_a_code_that_says_why(
    sidecars: Sidecars, ca_bundle: Path
) -> None:
    """Turn 1 replays; turn 2 must go live and the server is gone: the agent's connection closes
    with 4502 within seconds, the turn journaled as never sent."""
    gone = ws_api.Server()
    sidecar = sidecars.start(durable_ws_resume="live")  # /echo keeps nothing per connection
    run = new_run()
    url = f"{gone.url}/echo"
    assert closed_with(url, sidecar.proxy_url(run, "a1"), ca_bundle, ["one", "close"])[1] == 1000
    gone.stop()
    got, code, reason, waited = closed_with(url, sidecar.proxy_url(run, "a2"), ca_bundle, ["one", "two"])
    assert code == 4502 and "could not be reached" in reason and waited < 5, (code, reason, waited)


def test_a_servers_close_reaches_the_agent_live_after_a_replay_and_again_when_replayed(
    sidecars: Sidecars, api: ws_api.Server, ca_bundle: Path
) -> None:
    """Attempt 2 replays "one", then "close 4001" goes live on the sidecar's own upstream connection
    and the server closes with 4001: the agent gets 4001 and its reason. Attempt 3 replays the whole
    conversation, the close included, with no upstream connection."""
    sidecar = sidecars.start(durable_ws_resume="live")  # /echo keeps nothing per connection
    run = new_run()
    url = f"{api.url}/echo"
    assert closed_with(url, sidecar.proxy_url(run, "a1"), ca_bundle, ["one", "close"])[1] == 1000
    live = closed_with(url, sidecar.proxy_url(run, "a2"), ca_bundle, ["one", "close 4001"])
    assert live[1:3] == (4001, "asked to") and live[3] < 5, live
    books = ws_api.LEDGER.books()
    assert (books["calls"], books["connections"]) == (3, 2)  # only "close 4001" went upstream
    replayed = closed_with(url, sidecar.proxy_url(run, "a3"), ca_bundle, ["one", "close 4001"])
    assert replayed[:3] == live[:3] and replayed[3] < 5, replayed
    assert ws_api.LEDGER.books()["connections"] == 2


def journal_writes(metrics: int, statement: str) -> float:
    """How many times the sidecar ran a journal statement (its Prometheus histogram's count)."""
    text = requests.get(f"http://127.0.0.1:{metrics}/metrics", timeout=10).text
    label = f'durable_journal_write_seconds_count{{statement="{statement}"}} '
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(label))


@pytest.mark.parametrize("connection", ["mitmproxy's", "the sidecar's own"])
def test_a_burst_with_no_end_marker_costs_a_commit_per_read_and_arrives_whole_before_the_close(
    sidecars: Sidecars, api: ws_api.Server, ca_bundle: Path, pg_dsn: str, connection: str
) -> None:
    """/echo answers "burst 60 4001" with 60 messages back to back, then closes with 4001. Each is
    journaled before the agent has it, but a read's messages share one commit (ws_batch.py; the
    flusher on the sidecar's own upstream after a replay): far fewer commits than messages, all 60
    delivered in order, then the close, and the journal holds all 60 and the close."""
    metrics = launcher.free_port()
    sidecar = sidecars.start(durable_ws_resume="live", durable_metrics_listen=f"127.0.0.1:{metrics}")
    run, url, burst = new_run(), f"{api.url}/echo", "burst 60 4001"
    messages = [burst]
    if connection == "the sidecar's own":  # "one" replays; the burst goes live on a connection of the sidecar's
        assert closed_with(url, sidecar.proxy_url(run, "a1"), ca_bundle, ["one", "close"])[1] == 1000
        messages = ["one", burst]
    before = journal_writes(metrics, "journal server pushes") + journal_writes(metrics, "journal response")
    got, code, reason, _ = closed_with(url, sidecar.proxy_url(run, "a2"), ca_bundle, messages)
    parts = [f"part {n} of {burst}" for n in range(60)]
    assert got[-60:] == parts and (code, reason) == (4001, "after a burst")
    commits = journal_writes(metrics, "journal server pushes") + journal_writes(metrics, "journal response") - before
    assert 1 <= commits <= 20, commits  # 60 on one commit per message (plus the steps' own answers)
    body = sql(pg_dsn, "SELECT response_body FROM durable_steps WHERE run_id = %s AND method = 'WS'"
                       " ORDER BY seq DESC LIMIT 1", run)[0][0]
    answer = json.loads(bytes(body))
    assert [m["text"] for m in answer["messages"]] == parts and answer["closed"] == 4001


@pytest.mark.parametrize("connection", ["mitmproxy's", "the sidecar's own"])
def test_a_message_whose_commit_is_refused_never_reaches_the_agent(
    sidecars: Sidecars, api: ws_api.Server, ca_bundle: Path, pg_dsn: str, connection: str
) -> None:
    """The run's steps are deleted while the server works on "wait 1500": its answer (no end marker)
    cannot be journaled (the step is gone), so it is held back (ws_batch.py's layer, or the flusher
    on the sidecar's own upstream after a replay) and the agent gets the 4503 close, never an answer
    the journal does not have."""
    sidecar = sidecars.start(durable_ws_resume="live")  # /echo keeps nothing per connection
    run, url, messages, replayed = new_run(), f"{api.url}/echo", ["wait 1500"], []
    if connection == "the sidecar's own":  # "one" and its answer journaled, then replayed
        assert converse(url, sidecar, "a1", run, ca_bundle, ["one"], read=1) == [["echo 1: one"]]
        messages, replayed = ["one", "wait 1500"], ["echo 1: one"]
    calls = ws_api.LEDGER.books()["calls"] + 1

    def delete_when_booked() -> None:
        eventually(lambda: ws_api.LEDGER.books()["calls"], calls)
        sql(pg_dsn, "DELETE FROM durable_steps WHERE run_id = %s", run)

    deleter = threading.Thread(target=delete_when_booked)
    deleter.start()
    got, code, _, waited = closed_with(url, sidecar.proxy_url(run, "a2"), ca_bundle, messages)
    deleter.join()
    assert (got, code) == (replayed, 4503) and waited < 5, (got, code, waited)


def test_an_answer_with_no_end_marker_is_journaled_before_the_agent_has_it(
    sidecars: Sidecars, api: ws_api.Server, ca_bundle: Path, pg_dsn: str, tmp_path: Path
) -> None:
    """/echo's answers have no end marker. The agent gets the answer to "pay 1" and is SIGKILLed
    before it sends anything else: the answer it got was journaled before it got it, so the restart
    is answered from the journal and the upstream charges "pay 1" once."""
    sidecar = sidecars.start(durable_ws_resume="live")  # /echo keeps nothing per connection
    run = new_run()
    url = f"{api.url}/echo"
    script = tmp_path / "echo_agent.py"
    script.write_text(ECHO_AGENT)
    killed = subprocess.run([sys.executable, str(script), url, sidecar.proxy_url(run, "a1"), str(ca_bundle)],
                            capture_output=True, text=True, timeout=60)
    assert killed.returncode == -9 and killed.stdout.startswith("echo 1: pay 1"), killed.stderr
    again = converse(url, sidecar, "a2", run, ca_bundle, ["pay 1", "pay 2"], read=1)
    assert again == [["echo 1: pay 1"], ["echo 2: pay 2"]]
    assert ws_api.LEDGER.books()["messages"] == ["pay 1", "pay 2"]  # nothing charged twice


def add(n: int, rpc: bool) -> str:
    return json.dumps({"jsonrpc": "2.0", "id": n, "method": "add", "params": {"n": n}}) if rpc else f"add {n}"


@pytest.mark.parametrize("rpc", [False, True], ids=["plain", "json-rpc"])
def test_a_stateful_server_never_answers_without_the_state_the_agent_believes_in(
    sidecars: Sidecars, api: ws_api.Server, ca_bundle: Path, rpc: bool
) -> None:
    """/sum keeps a running total per connection. Attempt 1 adds 1 and 2; attempt 2 adds 1 to 4:
    1 and 2 are replayed, 3 must go live on a new connection that never saw them. By default the
    agent's connection is closed (4410, nothing sent, nothing charged) instead of 3 being answered
    with a total of 3; with durable_ws_resume=resend, 1 and 2 are sent again on the new connection
    first (paid again) and 3 and 4 get the right totals, 6 and 10."""
    url = f"{api.url}/sum"
    sidecar = sidecars.start()
    run = new_run()
    first = converse(url, sidecar, "a1", run, ca_bundle, [add(1, rpc), add(2, rpc)], read=1)
    got, code, reason, waited = closed_with(url, sidecar.proxy_url(run, "a2"), ca_bundle,
                                            [add(n, rpc) for n in (1, 2, 3, 4)])
    assert got == [answer for [answer] in first] and code == 4410 and "durable_ws_resume" in reason, (got, code)
    assert waited < 5 and ws_api.LEDGER.books()["calls"] == 2  # nothing sent, nothing charged

    resending = sidecars.start(durable_ws_resume="127.0.0.1=resend")
    again = converse(url, resending, "a3", run, ca_bundle, [add(n, rpc) for n in (1, 2, 3, 4)], read=1)
    totals = [json.loads(a)["result"]["total"] if rpc else int(a.split()[1]) for [a] in again]
    assert totals == [1, 3, 6, 10]
    assert ws_api.LEDGER.books()["calls"] == 2 + 2 + 2  # 1 and 2 paid again by the re-send, as documented


def test_an_answer_past_the_body_cap_streams_through_in_bounded_memory_and_stays_in_doubt(
    sidecars: Sidecars, api: ws_api.Server, ca_bundle: Path, pg_dsn: str
) -> None:
    """One message answered by 64 binary messages of 1 MiB: past durable_body_cap (16 MiB) the rest
    streams through unjournaled, the agent gets all 64 intact, the step is left in doubt (as a
    too-big HTTP answer is), and the sidecar's memory stays under 250 MB throughout (it grew to
    410 MB recording this before the cap applied to WebSocket answers)."""
    import threading

    import psutil

    sidecar = sidecars.start(durable_ws_resume="live")
    process = psutil.Process(sidecar.process.pid)
    peak = [process.memory_info().rss]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak.append(process.memory_info().rss)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    run = new_run()

    async def talk() -> list[bytes]:
        proxy = sidecar.proxy_url(run, "a1")
        context = ssl.create_default_context(cafile=str(ca_bundle))
        async with connect(f"{api.url}/echo", proxy=proxy, ssl=context, open_timeout=20, max_size=None) as ws:
            await ws.send("blob 64 1048576")
            return [bytes(await asyncio.wait_for(ws.recv(), 30)) for _ in range(64)]

    try:
        got = asyncio.run(talk())
    finally:
        done.set()
        watcher.join()
    assert [(len(b), b[0]) for b in got] == [(1048576, n) for n in range(64)]
    print(f"peak RSS {max(peak) / 2**20:.0f} MiB")
    assert max(peak) < 250 * 1024 * 1024, f"peak RSS {max(peak) / 2**20:.0f} MiB"
    query = "SELECT state, response_body IS NULL FROM durable_steps WHERE run_id = %s AND method = 'WS'"
    assert eventually(lambda: sql(pg_dsn, query, run), [("pending", True)]) == [("pending", True)]


ECHO_AGENT = '''
import asyncio, os, signal, ssl, sys
from websockets.asyncio.client import connect
url, proxy, bundle = sys.argv[1:4]
async def main():
    async with connect(url, proxy=proxy, ssl=ssl.create_default_context(cafile=bundle), open_timeout=20) as ws:
        await ws.send("pay 1")
        print(await asyncio.wait_for(ws.recv(), 30), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # got its answer, dies before its next message
asyncio.run(main())
'''


AGENT = '''
import asyncio, json, os, signal, ssl, sys
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
url, proxy, bundle, crash_after = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
mid = len(sys.argv) > 5 and sys.argv[5] == "mid"  # die on the first event of that turn, mid-answer
async def main():
    async with connect(url, proxy=proxy, ssl=ssl.create_default_context(cafile=bundle), open_timeout=20) as ws:
        for n in (1, 2, 3):
            # turn 2's answer ends a second after it begins: time to die (or be killed) mid-answer
            await ws.send(json.dumps({"type": "response.create", "model": "m", "input": f"turn {n}"}
                                     | ({"x_delay_ms": 1000} if n == 2 else {})))
            while (event := json.loads(await asyncio.wait_for(ws.recv(), 30)))["type"] != "response.completed":
                if n == crash_after and mid:
                    os.kill(os.getpid(), signal.SIGKILL)
            print(event["response"]["output"][0]["content"][0]["text"], flush=True)
            if n == crash_after:
                os.kill(os.getpid(), signal.SIGKILL)
asyncio.run(main())
'''
