"""Exactly-once when a connection fails, not a process (issue 24, DESIGN.md section 3.10).

Real sidecars, real PostgreSQL, and a TCP relay between them (scripts/relay.py) that cuts, freezes
or loses replies; the paid API's books judge, on its two endpoints: one that honours Idempotency-Key
(payments) and one that ignores it (generations, like the LLM APIs).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
import requests

from conftest import PaidApi, Sidecars, new_run, sql
from durable_sidecar import launcher, lease
from relay import Relay

ENDPOINTS = {"honours-key": ("/v1/payments", {"amount": 7}), "ignores-key": ("/v1/generate", {"prompt": "q3"})}


@pytest.fixture
def relayed(fresh_dsn: str) -> Iterator[tuple[Relay, str]]:
    relay, dsn = Relay.for_dsn(fresh_dsn)
    yield relay, dsn
    relay.close()


def post(sidecar: launcher.Sidecar, run: str, attempt: str, url: str, body: dict, timeout: float = 60) -> requests.Response:
    return requests.post(url, json=body, timeout=timeout, proxies={"http": sidecar.proxy_url(run, attempt)})


def charges(api: PaidApi) -> int:
    return len(api.books()["booked"])


def health(sidecar: launcher.Sidecar) -> requests.Response:
    return requests.get("http://durable.sidecar/health", timeout=30,
                        proxies={"http": f"http://127.0.0.1:{sidecar.port}"})


def lease_backend(dsn: str, lease_id: int) -> int:
    rows = sql(dsn, "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = %s AND objid = %s AND granted",
               lease.CLASS, lease_id)
    return rows[0][0]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("how", ["terminated", "idle_session_timeout"])
def test_a_live_sidecar_that_loses_its_lease_keeps_its_call(
    sidecars: Sidecars, http_api: PaidApi, fresh_dsn: str, pg_server: str, endpoint: str, how: str
) -> None:
    """Sidecar A sends a 5 s call; its lease's session is ended (by an operator, or by the database's
    idle_session_timeout of 2 s); attempt 2 makes the call on sidecar B meanwhile. A takes its lease
    again at once, so B waits for A's answer and replays it: one charge, both attempts get it."""
    if how == "idle_session_timeout":
        dbname = sql(fresh_dsn, "SELECT current_database()")[0][0]
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{dbname}" SET idle_session_timeout = \'2s\'')
    policy = "fail" if endpoint == "ignores-key" else "reissue"
    a = sidecars.start(durable_dsn=fresh_dsn, durable_in_doubt=f"127.0.0.1={policy}")
    b = sidecars.start(durable_dsn=fresh_dsn, durable_in_doubt=f"127.0.0.1={policy}")
    path, body = ENDPOINTS[endpoint]
    url, run = f"{http_api.url}{path}?delay_ms=5000", new_run()
    before = charges(http_api)
    first: dict[str, requests.Response] = {}
    sender = threading.Thread(target=lambda: first.setdefault("r", post(a, run, "a1", url, body)))
    sender.start()
    deadline = time.monotonic() + 10
    while charges(http_api) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    lease_id = health(a).json()["lease"]
    if how == "terminated":
        sql(fresh_dsn, "SELECT pg_terminate_backend(%s)", lease_backend(fresh_dsn, lease_id))
    time.sleep(2.5)  # past the idle timeout, and long enough for B to take over without the fix
    second = post(b, run, "a2", url, body)
    sender.join()
    assert first["r"].ok and second.ok, (first["r"].text, second.text)
    assert second.headers["Durable-Outcome"] == "replayed" and second.content == first["r"].content
    assert charges(http_api) == before + 1
    assert f"lease {lease_id} taken again" in a.log() or how == "idle_session_timeout"


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_an_answer_whose_commit_fails_is_held_and_never_re_sent(
    sidecars: Sidecars, http_api: PaidApi, relayed: tuple[Relay, str], endpoint: str
) -> None:
    """The journal's link is cut while the upstream works on the call and heals later: the agent gets
    a 503, the sidecar holds the paid answer and journals it once the link is back, and the agent's
    retry (same attempt) and a later attempt both get that answer; the upstream is called once, even
    under durable_in_doubt=fail."""
    relay, dsn = relayed
    sidecar = sidecars.start(durable_dsn=dsn, durable_in_doubt="127.0.0.1=fail", durable_db_timeout=1000)
    path, body = ENDPOINTS[endpoint]
    url, run = f"{http_api.url}{path}?delay_ms=1500", new_run()
    before = http_api.books()["calls"]
    result: dict[str, requests.Response] = {}
    sender = threading.Thread(target=lambda: result.setdefault("r", post(sidecar, run, "a1", url, body)))
    sender.start()
    deadline = time.monotonic() + 10
    while http_api.books()["calls"] == before and time.monotonic() < deadline:
        time.sleep(0.02)
    relay.cut()
    sender.join()
    assert result["r"].status_code == 503 and "holds the answer" in result["r"].json()["reason"]
    assert "held" in sidecar.log()
    relay.heal()
    retries, retry = 0, result["r"]
    while not retry.ok and retries < 40:
        time.sleep(0.25)
        retry, retries = post(sidecar, run, "a1", url, body), retries + 1
    assert retry.ok and retry.headers["Durable-Outcome"] == "replayed", retry.text
    later = post(sidecar, run, "a2", url, body)
    assert later.headers["Durable-Outcome"] == "replayed" and later.content == retry.content
    assert http_api.books()["calls"] == before + 1


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_a_step_whose_pending_commit_reply_was_lost_is_sent_once(
    sidecars: Sidecars, http_api: PaidApi, relayed: tuple[Relay, str], endpoint: str
) -> None:
    """The pending row commits but its reply never arrives: the sidecar answers 503 and never
    forwarded the call. It is not in doubt: the agent's retry sends it (outcome recorded), once, even
    under durable_in_doubt=fail, and nothing is charged twice."""
    relay, dsn = relayed
    sidecar = sidecars.start(durable_dsn=dsn, durable_in_doubt="127.0.0.1=fail", durable_db_timeout=1000)
    path, body = ENDPOINTS[endpoint]
    run = new_run()
    assert post(sidecar, run, "a1", f"{http_api.url}/v1/echo", {"warm": 1}).ok  # the run's index and the lease in
    before = http_api.books()["calls"]
    relay.drop_replies()
    lost = post(sidecar, run, "a1", f"{http_api.url}{path}", body)
    relay.heal()
    assert lost.status_code == 503 and http_api.books()["calls"] == before  # nothing forwarded
    assert sql(dsn, "SELECT state FROM durable_steps WHERE run_id = %s AND seq = 2", run) == [("pending",)]
    retry = lost
    for _ in range(40):
        retry = post(sidecar, run, "a1", f"{http_api.url}{path}", body)
        if retry.ok:
            break
        time.sleep(0.25)
    assert retry.ok and retry.headers["Durable-Outcome"] == "recorded", retry.text
    assert http_api.books()["calls"] == before + 1
    again = post(sidecar, run, "a2", f"{http_api.url}{path}", body)
    assert again.headers["Durable-Outcome"] == "replayed" and http_api.books()["calls"] == before + 1


def test_a_frozen_link_answers_on_time_and_health_says_so(
    sidecars: Sidecars, http_api: PaidApi, relayed: tuple[Relay, str]
) -> None:
    """The link freezes (bytes held, no reset). A new call is refused within durable_db_timeout + 1 s,
    /health stops saying ready, an attempt whose answers are already read ahead is replayed without
    the journal, and once the link heals the sidecar serves again by itself."""
    relay, dsn = relayed
    sidecar = sidecars.start(durable_dsn=dsn, durable_db_timeout=2000)
    run = new_run()
    for n in range(3):
        assert post(sidecar, run, "a1", f"{http_api.url}/v1/echo?n={n}", {"n": n}).ok
    first = post(sidecar, run, "a2", f"{http_api.url}/v1/echo?n=0", {"n": 0})  # a2 reads ahead
    assert first.headers["Durable-Outcome"] == "replayed"
    time.sleep(0.5)
    relay.freeze()
    started = time.monotonic()
    fresh = post(sidecar, run, "a2", f"{http_api.url}/v1/echo?n=new", {"n": "new"})
    waited = time.monotonic() - started
    assert fresh.status_code == 503 and waited < 2.0 + 1.0, (waited, fresh.text)
    replayed = post(sidecar, run, "a2", f"{http_api.url}/v1/echo?n=1", {"n": 1}, timeout=3)
    assert replayed.headers["Durable-Outcome"] == "replayed"
    started = time.monotonic()
    assert health(sidecar).status_code == 503 and time.monotonic() - started < 2.0 + 1.5
    relay.heal()
    deadline = time.monotonic() + 20
    while health(sidecar).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    again = post(sidecar, run, "a2", f"{http_api.url}/v1/echo?n=new", {"n": "new"})
    assert again.status_code == 200 and again.headers["Durable-Outcome"] in ("recorded", "diverged"), again.text
    assert json.loads(again.content)  # the upstream's own answer


DYING_AGENT = """
import os, sys, threading, time, requests
threading.Thread(target=lambda: requests.post(sys.argv[1], json={"prompt": "q3"}, timeout=60), daemon=True).start()
time.sleep(float(sys.argv[2]))
os._exit(3)  # dies mid-call
"""
AGENT = """
import sys, requests
r = requests.post(sys.argv[1], json={"prompt": "q3"}, timeout=60)
print(r.headers.get("durable-outcome"), r.status_code)
"""


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_durable_run_drains_the_call_its_agent_left_in_flight(
    http_api: PaidApi, pg_dsn: str, tmp_path, endpoint: str
) -> None:
    """`durable run` with its own sidecar; the agent dies while the upstream works on its call (1.5 s).
    The launcher stops its sidecar only after the agent exited, and the sidecar drains: it finishes and
    journals the call before it exits. The next run of the agent gets it replayed: one charge."""
    import subprocess
    import sys
    from pathlib import Path

    durable = str(Path(sys.executable).with_name("durable"))
    (tmp_path / "dying.py").write_text(DYING_AGENT)
    (tmp_path / "agent.py").write_text(AGENT)
    path, _ = ENDPOINTS[endpoint]
    url, run = f"{http_api.url}{path}?delay_ms=1500", new_run()
    before = http_api.books()["calls"]
    first = subprocess.run([durable, "run", "--run", run, "--dsn", pg_dsn, "--", sys.executable,
                            str(tmp_path / "dying.py"), url, "0.5"], capture_output=True, text=True, timeout=120)
    assert first.returncode == 3, first.stderr
    assert "Traceback" not in first.stderr
    second = subprocess.run([durable, "run", "--run", run, "--dsn", pg_dsn, "--", sys.executable,
                             str(tmp_path / "agent.py"), url], capture_output=True, text=True, timeout=120)
    assert second.stdout.split()[0] == "replayed", (second.stdout, second.stderr)
    assert http_api.books()["calls"] == before + 1


SCRIPT_AGENT = """
for i in 1 2 3; do
  curl -s -x "$PROXY" -H 'content-type: application/json' -d '{"prompt": "poll"}' -D - -o /dev/null "$URL" \\
    | tr -d '\\r' | sed -n 's/^durable-outcome: //ip'
done
"""
POOL_AGENT = """
import multiprocessing, os, requests

def call(n):
    r = requests.post(os.environ["URL"], json={"prompt": f"part {n}"}, timeout=30,
                      proxies={"http": os.environ["PROXY"]})
    return r.headers["durable-outcome"]

if __name__ == "__main__":
    with multiprocessing.Pool(3) as pool:
        print("\\n".join(pool.map(call, range(3))))
"""


@pytest.mark.parametrize("agent", ["shell-calling-curl", "multiprocessing-pool"])
def test_a_second_start_of_the_agent_under_the_same_attempt_replays(
    sidecars: Sidecars, http_api: PaidApi, tmp_path, agent: str
) -> None:
    """The same run and attempt id exported in a shell, and the agent started twice (each start a
    process group of its own, as an interactive shell makes them). Within one start, the agent's many
    processes (curl three times from a script, a pool of three workers) are one attempt: three calls
    recorded, the polls of one URL not answered with the first poll's answer. The second start is an
    attempt of its own: everything replayed, nothing paid twice."""
    import subprocess
    import sys

    sidecar = sidecars.start()
    run = new_run()
    env = {"PROXY": sidecar.proxy_url(run, "exported-once"), "URL": f"{http_api.url}/v1/generate", "PATH": "/usr/bin:/bin"}
    if agent == "shell-calling-curl":
        (tmp_path / "agent.sh").write_text(SCRIPT_AGENT)
        command = ["sh", str(tmp_path / "agent.sh")]
    else:
        (tmp_path / "agent.py").write_text(POOL_AGENT)
        command = [sys.executable, str(tmp_path / "agent.py")]
    before = http_api.books()["calls"]
    outcomes = []
    for _ in range(2):  # up-arrow and Enter
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, start_new_session=True)
        outcomes.append(done.stdout.split())
    assert outcomes[0] == ["recorded"] * 3, outcomes
    assert outcomes[1] == ["replayed"] * 3, outcomes
    assert http_api.books()["calls"] == before + 3
    assert "used by a second start of the agent" in sidecar.log()
