"""Exactly-once discipline beyond single crashes: transient failures, a database outage, concurrency."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import openai
import psycopg
import pytest
import requests

from durable_sidecar.tools import launcher
from conftest import PaidApi, Sidecars, new_run, sql


def via(sidecar: launcher.Sidecar, run: str, attempt: str) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.proxies = {"http": sidecar.proxy_url(run, attempt)}
    return session


def test_transient_failure_at_the_tail_is_retried_live(sidecars: Sidecars, http_api: PaidApi, pg_dsn: str) -> None:
    sidecar = sidecars.start()
    run, url = new_run(), f"{http_api.url}/v1/flaky"
    http_api.fail_next(1)
    r1 = via(sidecar, run, "a1").get(url)
    assert r1.status_code == 503 and r1.headers["Durable-Outcome"] == "recorded"
    assert sql(pg_dsn, "SELECT state, status FROM durable_steps WHERE run_id = %s", run) == [("failed", 503)]
    r2 = via(sidecar, run, "a2").get(url)  # the agent crashed on the outage and came back
    assert r2.status_code == 200 and r2.headers["Durable-Outcome"] == "reissued" and r2.headers["Durable-Step"] == "1"
    r3 = via(sidecar, run, "a3").get(url)
    assert r3.headers["Durable-Outcome"] == "replayed" and r3.json() == r2.json()
    assert http_api.books()["charges"] == 1


def test_transient_failure_the_run_moved_past_is_replayed(sidecars: Sidecars, http_api: PaidApi) -> None:
    sidecar = sidecars.start()
    run = new_run()
    http_api.fail_next(1)
    a1 = via(sidecar, run, "a1")
    assert a1.get(f"{http_api.url}/v1/flaky").status_code == 503
    a1.get(f"{http_api.url}/v1/search", params={"q": "after the failure"})
    a2 = via(sidecar, run, "a2")
    r = a2.get(f"{http_api.url}/v1/flaky")
    assert r.status_code == 503 and r.headers["Durable-Outcome"] == "replayed"  # the agent handled it then
    assert a2.get(f"{http_api.url}/v1/search", params={"q": "after the failure"}).headers["Durable-Outcome"] == "replayed"
    assert http_api.books()["calls"] == 2


def test_connection_error_is_journaled_failed_and_retried(
    sidecars: Sidecars, tmp_path: Path, pg_dsn: str
) -> None:
    api = PaidApi(tmp_path, tls=False, port=launcher.free_port(), start=False)  # nothing listens yet
    sidecar = sidecars.start()
    run = new_run()
    r1 = via(sidecar, run, "a1").get(f"{api.url}/v1/search", params={"q": "down"})
    assert r1.status_code == 502  # mitmproxy's own answer, labelled like every other
    assert (r1.headers["Durable-Run-Id"], r1.headers["Durable-Step"], r1.headers["Durable-Outcome"]) == (run, "1", "recorded")
    (state, error), = sql(pg_dsn, "SELECT state, error FROM durable_steps WHERE run_id = %s", run)
    assert state == "failed" and error
    api.start()
    try:
        r2 = via(sidecar, run, "a2").get(f"{api.url}/v1/search", params={"q": "down"})
        assert r2.status_code == 200 and r2.headers["Durable-Outcome"] == "reissued"
        assert api.books()["charges"] == 1
    finally:
        api.stop()


def set_connections(admin_dsn: str, dbname: str, allowed: bool) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS {str(allowed).lower()}')
        if not allowed:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (dbname,))


def test_database_outage_fails_closed_and_recovers_unaided(
    sidecars: Sidecars, http_api: PaidApi, fresh_dsn: str, pg_server: str
) -> None:
    dbname = psycopg.conninfo.conninfo_to_dict(fresh_dsn)["dbname"]
    sidecar = sidecars.start(durable_dsn=fresh_dsn, durable_db_timeout=1000)
    run = new_run()
    agent = via(sidecar, run, "a1")
    assert agent.post(f"{http_api.url}/v1/payments", json={"amount": 1}).status_code == 201

    set_connections(pg_server, dbname, allowed=False)
    try:
        for amount in (2, 3):
            r = agent.post(f"{http_api.url}/v1/payments", json={"amount": amount})
            assert r.status_code == 503 and "journal unavailable" in r.json()["reason"]
        assert http_api.books()["calls"] == 1  # nothing reached the upstream during the outage
    finally:
        set_connections(pg_server, dbname, allowed=True)

    deadline = time.monotonic() + 30
    while (r := agent.post(f"{http_api.url}/v1/payments", json={"amount": 2})).status_code == 503:
        assert time.monotonic() < deadline, "the sidecar did not recover by itself"
        time.sleep(0.2)
    assert r.status_code == 201 and r.headers["Durable-Outcome"] == "recorded"
    assert sidecar.process.poll() is None
    rows = sql(fresh_dsn, "SELECT seq, state, request_body::text FROM durable_steps WHERE run_id = %s ORDER BY seq", run)
    assert [(seq, state) for seq, state, _ in rows] == [(1, "completed"), (2, "completed")]
    assert http_api.books()["charges"] == 2


def test_two_sidecars_hammering_one_run(sidecars: Sidecars, http_api: PaidApi, pg_dsn: str) -> None:
    first, second = sidecars.start(), sidecars.start()
    run = new_run()
    answers: dict[int, bytes] = {}
    lock = threading.Lock()

    def hammer(sidecar: launcher.Sidecar, attempt: str, amounts: range) -> None:
        session = via(sidecar, run, attempt)
        for amount in amounts:
            r = session.post(f"{http_api.url}/v1/payments", json={"amount": amount})
            assert r.status_code == 201
            with lock:
                answers[amount] = r.content

    threads = [
        threading.Thread(target=hammer, args=(sidecar, f"{name}-{i}", range(start, start + 15)))
        for i, (sidecar, name, start) in enumerate(
            [(first, "x", 0), (first, "x", 100), (second, "y", 200), (second, "y", 300)]
        )
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 60
    seqs = [row[0] for row in sql(pg_dsn, "SELECT seq FROM durable_steps WHERE run_id = %s ORDER BY seq", run)]
    assert seqs == list(range(1, 61))  # unique and dense
    assert sql(pg_dsn, "SELECT last_seq FROM durable_runs WHERE id = %s", run) == [(60,)]

    replay = via(first, run, "replay")
    for amount, body in answers.items():
        r = replay.post(f"{http_api.url}/v1/payments", json={"amount": amount})
        assert r.headers["Durable-Outcome"] == "replayed" and r.content == body
    assert http_api.books()["charges"] == 60


def test_identical_parallel_requests_each_get_their_own_step(sidecars: Sidecars, http_api: PaidApi) -> None:
    sidecar = sidecars.start()
    run = new_run()

    async def burst(attempt: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(proxy=sidecar.proxy_url(run, attempt), trust_env=False) as client:
            return await asyncio.gather(*(client.get(f"{http_api.url}/v1/search", params={"q": "same"}) for _ in range(10)))

    first = asyncio.run(burst("a1"))
    assert sorted(int(r.headers["durable-step"]) for r in first) == list(range(1, 11))
    second = asyncio.run(burst("a2"))
    assert {r.headers["durable-outcome"] for r in second} == {"replayed"}
    assert Counter(r.content for r in second) == Counter(r.content for r in first)
    assert http_api.books()["calls"] == 10


def test_idempotency_header_name_per_host(sidecars: Sidecars, http_api: PaidApi, pg_dsn: str) -> None:
    sidecar = sidecars.start(durable_idempotency_header="127.0.0.1=PayPal-Request-Id")
    run = new_run()
    via(sidecar, run, "a1").post(f"{http_api.url}/v1/payments", json={"amount": 4})
    seen = http_api.books()["requests"][-1]["headers"]
    assert "Idempotency-Key" not in seen and seen["PayPal-Request-Id"].startswith("durable-")
    assert sql(pg_dsn, "SELECT idempotency_key FROM durable_steps WHERE run_id = %s", run) == [(seen["PayPal-Request-Id"],)]
    via(sidecar, run, "a1").get(f"{http_api.url}/v1/search", params={"q": "GET gets no key"})
    assert "Idempotency-Key" not in http_api.books()["requests"][-1]["headers"]


def leave_in_doubt(sidecars: Sidecars, api: PaidApi, run: str) -> None:
    """A payment whose pending row is committed, then the sidecar dies before forwarding it."""
    doomed = sidecars.start(env={**os.environ, "DURABLE_FAULT": "after-pending-commit"})
    try:
        via(doomed, run, "a1").post(f"{api.url}/v1/payments", json={"amount": 5})
    except requests.ConnectionError:
        pass
    assert doomed.process.wait(10) == -9


def test_in_doubt_policy_fail_asks_an_operator(sidecars: Sidecars, http_api: PaidApi) -> None:
    run = new_run()
    leave_in_doubt(sidecars, http_api, run)
    sidecar = sidecars.start(durable_in_doubt="fail")
    r = via(sidecar, run, "a2").post(f"{http_api.url}/v1/payments", json={"amount": 5})
    assert r.status_code == 409
    body = r.json()
    assert body["run"] == run and body["step"] == 1 and body["resolve"].startswith(f"durable resolve {run} 1")
    assert http_api.books()["calls"] == 0


def test_in_doubt_steps_past_the_window_are_not_reissued(sidecars: Sidecars, http_api: PaidApi) -> None:
    run = new_run()
    leave_in_doubt(sidecars, http_api, run)
    sidecar = sidecars.start(durable_in_doubt_window="0s")
    r = via(sidecar, run, "a2").post(f"{http_api.url}/v1/payments", json={"amount": 5})
    assert r.status_code == 409 and "durable_in_doubt_window" in r.json()["reason"]
    assert http_api.books()["calls"] == 0


def test_a_step_forgotten_while_its_request_is_in_flight(sidecars: Sidecars, http_api: PaidApi, pg_dsn: str) -> None:
    """An operator forgets a pending step while the upstream works on it: the late answer is not
    written back into a row that is gone (nothing resurrected), the agent gets a 503 saying so, and
    the next attempt records the call afresh."""
    from durable_sidecar.tools import operations

    sidecar = sidecars.start()
    run, url = new_run(), f"{http_api.url}/v1/generate?delay_ms=1500"
    answer: dict[str, requests.Response] = {}
    thread = threading.Thread(target=lambda: answer.update(r=via(sidecar, run, "a1").post(url, json={"prompt": "p"})))
    thread.start()
    deadline = time.monotonic() + 20
    while http_api.books()["calls"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with operations.connect(pg_dsn) as conn:
        operations.resolve(conn, run, 1, "forget")
    thread.join()
    assert answer["r"].status_code == 503 and "no longer this sidecar's" in answer["r"].json()["failed"]
    assert sql(pg_dsn, "SELECT count(*) FROM durable_steps WHERE run_id = %s", run) == [(0,)]
    again = via(sidecar, run, "a2").post(url, json={"prompt": "p"})
    assert again.status_code == 200 and again.headers["Durable-Outcome"] == "recorded"
    assert http_api.books()["calls"] == 2 and sidecar.process.poll() is None


def test_an_agent_killed_before_its_request_body_was_sent_forwards_nothing(
    sidecars: Sidecars, http_api: PaidApi, pg_dsn: str
) -> None:
    """Half a request is never forwarded nor journaled: the agent dies after 100 of 1000 body bytes."""
    import base64
    import socket

    sidecar = sidecars.start()
    run = new_run()
    auth = base64.b64encode(f"{run}:a1".encode()).decode()
    with socket.create_connection(("127.0.0.1", sidecar.port), timeout=10) as conn:
        conn.sendall(f"POST {http_api.url}/v1/generate HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic {auth}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode() + b"{" + b" " * 99)
        time.sleep(0.3)
    time.sleep(0.5)
    assert http_api.books()["calls"] == 0
    assert sql(pg_dsn, "SELECT count(*) FROM durable_steps WHERE run_id = %s", run) == [(0,)]
    assert sidecar.process.poll() is None


def test_an_orphan_is_finished_counted_and_replayed(sidecars: Sidecars, http_api: PaidApi, tmp_path: Path) -> None:
    """The agent (a real process) is SIGKILLed while a key-ignoring upstream generates: the sidecar
    finishes the call, logs and counts the orphan, and the next attempt gets that answer replayed."""
    import signal
    import subprocess
    import sys

    port = launcher.free_port()
    sidecar = sidecars.start(durable_metrics_listen=f"127.0.0.1:{port}")
    run, url = new_run(), f"{http_api.url}/v1/generate?delay_ms=1500"
    agent_code = "import requests, sys; requests.post(sys.argv[1], json={'prompt': 'orphan'}, timeout=60)"
    env = launcher.agent_env(sidecar.proxy_url(run, "a1"), tmp_path / "unused.pem")
    agent = subprocess.Popen([sys.executable, "-c", agent_code, url], env=env)
    deadline = time.monotonic() + 20
    while http_api.books()["calls"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    again = via(sidecar, run, "a2").post(url, json={"prompt": "orphan"})  # waits for the orphan, then replays it
    assert again.status_code == 200 and again.headers["Durable-Outcome"] == "replayed"
    assert again.json()["id"] == "chatcmpl-1" and http_api.books()["calls"] == 1
    assert "the sidecar finished the call and journaled its answer (orphan #1)" in sidecar.log()
    metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert "durable_orphans_finished_total 1.0" in metrics


@pytest.mark.parametrize("endpoint", ["generate", "payments"])  # ignores Idempotency-Key / honours it
def test_an_sdk_retry_after_its_own_timeout_waits_for_the_orphan_instead_of_paying_again(
    endpoint: str, sidecars: Sidecars, https_api: PaidApi, ca_bundle: Path
) -> None:
    """The openai SDK times out (0.5 s) while the upstream works for 1.5 s, hangs up and retries in
    the same attempt. The call it gave up on is finished as an orphan and its step given back, so
    each retry is that step again: it waits for the orphan and gets its answer. One upstream call."""
    sidecar = sidecars.start()
    tls = ssl.create_default_context(cafile=str(ca_bundle))
    http_client = httpx.Client(proxy=sidecar.proxy_url(new_run(), "a1"), verify=tls, trust_env=False)
    client = openai.OpenAI(base_url=f"{https_api.url}/v1", api_key="sk-test", http_client=http_client,
                           timeout=0.5, max_retries=6)
    body = {"prompt": "retried"} if endpoint == "generate" else {"amount": 5}
    answer = client.post(f"/{endpoint}", cast_to=httpx.Response, body=body, options={"params": {"delay_ms": 1500}})
    assert answer.headers["Durable-Outcome"] == "replayed" and answer.headers["Durable-Step"] == "1"
    assert https_api.books()["calls"] == 1  # the SDK sent it several times; the upstream saw it once
    assert "(orphan #1)" in sidecar.log()


def test_an_http2_agent_that_hangs_up_mid_call_leaves_an_orphan_its_retry_gets(
    sidecars: Sidecars, https_api: PaidApi, ca_bundle: Path, tmp_path: Path
) -> None:
    """curl speaks HTTP/2 to the sidecar and gives up after 0.5 s (closing its connection) while a
    key-ignoring upstream works for 1.5 s; the same call again, in the same attempt, is answered with
    the orphan's answer: one upstream call."""
    sidecar = sidecars.start()
    run, url = new_run(), f"{https_api.url}/v1/generate?delay_ms=1500"
    answers = []
    for give_up_after in ("0.5", "30"):
        head = tmp_path / f"head-{give_up_after}"
        curl = subprocess.run(
            ["curl", "-s", "--http2", "-m", give_up_after, "-D", str(head), "-o", os.devnull, "--cacert", str(ca_bundle),
             "-x", sidecar.proxy_url(run, "a1"), "-H", "Content-Type: application/json", "-d", '{"prompt": "h2"}', url],
            timeout=60,
        )
        answers.append((curl.returncode, head.read_text().split("\n\n")[-2].lower()))
    assert answers[0] == (28, "http/1.1 200 connection established")  # 28: curl's timeout; no answer
    assert answers[1][0] == 0 and answers[1][1].startswith("http/2 200")
    assert "durable-outcome: replayed" in answers[1][1] and "durable-step: 1" in answers[1][1]
    assert https_api.books()["calls"] == 1 and "(orphan #1)" in sidecar.log()


def test_an_orphan_past_its_timeout_is_let_go_and_resent_with_its_key(
    sidecars: Sidecars, http_api: PaidApi, pg_dsn: str
) -> None:
    """The agent hangs up while the upstream works for 4 s; with durable_orphan_timeout=1s the sidecar
    stops carrying the call after a second and leaves the step in doubt, nobody sending it (a later
    attempt need not wait for the upstream), and the next attempt re-sends it with its original key."""
    sidecar = sidecars.start(durable_orphan_timeout="1s")
    run = new_run()
    with pytest.raises(requests.RequestException):
        via(sidecar, run, "a1").post(f"{http_api.url}/v1/payments?delay_ms=4000", json={"amount": 5}, timeout=0.5)
    started = time.monotonic()
    owner = "SELECT state, owner IS NULL FROM durable_steps WHERE run_id = %s"
    while sql(pg_dsn, owner, run) != [("pending", True)] and time.monotonic() - started < 3:
        time.sleep(0.05)
    assert sql(pg_dsn, owner, run) == [("pending", True)] and time.monotonic() - started < 3  # let go at ~1 s, not 4
    assert "orphan still unanswered after durable_orphan_timeout" in sidecar.log()
    again = via(sidecar, run, "a2").post(f"{http_api.url}/v1/payments?delay_ms=4000", json={"amount": 5}, timeout=30)
    assert again.headers["Durable-Outcome"] == "reissued" and again.json()["payment_id"] == "pay_1"
    assert len(http_api.books()["booked"]) == 1  # the original key: the upstream booked it once


def test_under_fail_a_step_in_flight_elsewhere_is_waited_for_not_refused(
    sidecars: Sidecars, http_api: PaidApi
) -> None:
    """durable_in_doubt=fail is for steps nobody is sending. A second attempt, on another sidecar,
    reaching a step the first sidecar has in flight waits for it and gets it replayed: no 409."""
    options = {"durable_in_doubt": "127.0.0.1=fail"}
    first, second = sidecars.start(**options), sidecars.start(**options)
    run, url = new_run(), f"{http_api.url}/v1/generate?delay_ms=2000"
    answers: dict[str, requests.Response] = {}
    sender = threading.Thread(target=lambda: answers.setdefault("a1", via(first, run, "a1").post(url, json={"prompt": "p"})))
    sender.start()
    deadline = time.monotonic() + 10
    while http_api.books()["calls"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    waiting = via(second, run, "a2").post(url, json={"prompt": "p"})
    sender.join()
    assert waiting.status_code == 200 and waiting.headers["Durable-Outcome"] == "replayed", waiting.text
    assert waiting.content == answers["a1"].content and http_api.books()["calls"] == 1


def test_a_waiter_on_another_sidecar_whose_agent_hangs_up_gives_its_step_back(
    sidecars: Sidecars, http_api: PaidApi
) -> None:
    """Sidecar A sends a slow call (3 s). Attempt 2 makes the same call on sidecar B, which waits
    for A; its agent gives up after 0.5 s and retries. The waiter stops at its agent's hang-up and
    gives its step back, so the retry is that step again: it waits and gets A's answer replayed.
    A waiter that went on waiting would keep the step, and the retry would pay a second time."""
    a, b = sidecars.start(), sidecars.start()
    run = new_run()
    url = f"{http_api.url}/v1/slow?ms=3000"
    first: dict[str, requests.Response] = {}
    thread = threading.Thread(target=lambda: first.setdefault("r", via(a, run, "a1").get(url, timeout=30)))
    thread.start()
    deadline = time.monotonic() + 10
    while http_api.books()["calls"] < 1:
        assert time.monotonic() < deadline, "A never sent the call"
        time.sleep(0.02)
    agent = via(b, run, "a2")
    with pytest.raises(requests.Timeout):
        agent.get(url, timeout=0.5)  # the SDK's timeout: it hangs up while B waits for A
    time.sleep(0.5)  # B's next look (every 0.2 s) sees its agent gone
    retry = agent.get(url, timeout=30)
    thread.join()
    assert retry.headers["Durable-Outcome"] == "replayed" and retry.content == first["r"].content
    assert [c["kind"] for c in http_api.books()["booked"]] == ["slow"]  # one call, however many tries
