"""Chaos: the sidecar is SIGKILLed at each point of the step life cycle; sidecar and agent restart.

Against a local upstream that honours Idempotency-Key, every logical call must be booked exactly
once and the run must end with the same results as an uninterrupted one. The agent mints a random
Idempotency-Key per payment, like SDKs do, so only the sidecar's original key can deduplicate.
"""

from __future__ import annotations

import os
import ssl
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import requests

from durable_sidecar.steps import faults
from durable_sidecar.tools import launcher
from conftest import PaidApi, Sidecars, new_run, run_agent, sql

STEPS = 3
CALLS = STEPS * 3
# the 9th call: step 3's payment. Not step 2's (the 6th): step 2's LLM call streams, and an agent
# that stops reading at [DONE] can reach the 6th call before the upstream has ended that stream, so
# a kill there would also leave the stream's step in doubt (sent again on resume, as it should be)
# and the test would be timing one race instead of the fault point.
VICTIM = 9

# what the resumed attempt should see at the victim call, and how the upstream got there
EXPECTED = {
    "before-pending-commit": ("recorded", 0),  # never journaled, never sent: a plain first call
    "after-pending-commit": ("reissued", 0),  # journaled, never sent: sent once, on resume
    "before-complete-commit": ("reissued", 1),  # sent and booked, answer lost: upstream dedupes the key
    "after-complete-commit": ("replayed", 0),  # journaled, agent never saw it: answered from the journal
}


def results(calls: list[dict]) -> list[tuple]:
    return [(c["step"], c["call"], c["result"]) for c in calls]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, confdir: Path, pg_dsn: str) -> list[tuple]:
    """An uninterrupted run's results, on an upstream of its own."""
    api = PaidApi(tmp_path_factory.mktemp("reference-api"), tls=True)
    group = Sidecars(confdir, pg_dsn, api.ca)
    try:
        sidecar = group.start()
        bundle = launcher.write_ca_bundle(sidecar.ca_cert, tmp_path_factory.mktemp("ref") / "bundle.pem")
        _, calls = run_agent(sidecar, bundle, api, new_run(), "a1", steps=STEPS, random_keys=True)
        return results(calls)
    finally:
        group.close()
        api.stop()


@pytest.mark.parametrize("point", faults.POINTS)
def test_sidecar_killed_at_each_point_books_every_call_once(
    point: str, reference: list[tuple], sidecars: Sidecars, ca_bundle: Path, https_api: PaidApi, pg_dsn: str
) -> None:
    run = new_run()
    doomed = sidecars.start(env={**os.environ, "DURABLE_FAULT": f"{point}:{VICTIM}"})
    code, first = run_agent(doomed, ca_bundle, https_api, run, "a1", steps=STEPS, random_keys=True, may_fail=True)
    assert doomed.process.wait(10) == -9, "the sidecar should have died at the fault point"
    assert code != 0 and len(first) == VICTIM - 1

    sidecar = sidecars.start()
    code, second = run_agent(sidecar, ca_bundle, https_api, run, "a2", steps=STEPS, random_keys=True)
    assert code == 0
    outcome, deduplicated = EXPECTED[point]
    assert [c["outcome"] for c in second] == ["replayed"] * (VICTIM - 1) + [outcome] + ["recorded"] * (CALLS - VICTIM)
    assert results(second) == reference
    books = https_api.books()
    assert books["charges"] == CALLS and books["deduplicated"] == deduplicated
    assert sql(pg_dsn, "SELECT array_agg(seq ORDER BY seq), bool_and(state = 'completed') FROM durable_steps WHERE run_id = %s", run) == [
        (list(range(1, CALLS + 1)), True)
    ]


def test_sidecar_killed_while_the_upstream_holds_a_booked_charge(
    sidecars: Sidecars, ca_bundle: Path, https_api: PaidApi, pg_dsn: str
) -> None:
    """The judged case: booked upstream, not yet answered, sidecar SIGKILLed; no second charge."""
    run = new_run()
    verify = ssl.create_default_context(cafile=str(ca_bundle))
    url = f"{https_api.url}/v1/payments?delay_ms=3000"
    sidecar = sidecars.start()
    outcome: dict[str, object] = {}

    def agent_call() -> None:
        try:
            with httpx.Client(proxy=sidecar.proxy_url(run, "a1"), verify=verify, trust_env=False, timeout=30) as c:
                outcome["response"] = c.post(url, json={"amount": 99}, headers={"Idempotency-Key": "sdk-random-1"})
        except httpx.HTTPError as e:
            outcome["error"] = e

    thread = threading.Thread(target=agent_call)
    thread.start()
    deadline = time.monotonic() + 20
    while https_api.books()["charges"] == 0:
        assert time.monotonic() < deadline, "the upstream never booked the charge"
        time.sleep(0.02)
    sidecar.kill()  # booked upstream, answer not yet sent
    thread.join()
    assert "error" in outcome
    assert sql(pg_dsn, "SELECT state, idempotency_key FROM durable_steps WHERE run_id = %s", run) == [("pending", "sdk-random-1")]

    restarted = sidecars.start()
    with httpx.Client(proxy=restarted.proxy_url(run, "a2"), verify=verify, trust_env=False, timeout=30) as c:
        r = c.post(url, json={"amount": 99}, headers={"Idempotency-Key": "sdk-random-2"})  # a new random key
    assert r.status_code == 201 and r.headers["durable-outcome"] == "reissued"
    assert r.json()["payment_id"] == "pay_1"
    books = https_api.books()
    assert books["charges"] == 1 and books["deduplicated"] == 1
    assert books["requests"][-1]["headers"]["Idempotency-Key"] == "sdk-random-1"  # the original key, not the new one


def test_sidecar_killed_during_a_burst_of_group_commits(sidecars: Sidecars, http_api: PaidApi, pg_dsn: str) -> None:
    """24 agents pay at once, so journal writes share commits; the sidecar is SIGKILLed mid-burst.

    On resume, every payment is booked exactly once and every step ends completed: a batch is one
    transaction, committed before any of its requests leaves or any of its answers is delivered.
    """
    agents, calls = 24, 8
    port = launcher.free_port()
    doomed = sidecars.start(durable_metrics_listen=f"127.0.0.1:{port}")
    runs = [new_run() for _ in range(agents)]
    first: dict[tuple[int, int], bytes] = {}

    def agent(sidecar: launcher.Sidecar, attempt: str, i: int, answers: dict[tuple[int, int], bytes]) -> None:
        proxy = sidecar.proxy_url(runs[i], attempt)
        with requests.Session() as session:
            session.trust_env = False
            session.proxies = {"http": proxy, "https": proxy}
            for k in range(calls):
                try:
                    r = session.post(f"{http_api.url}/v1/payments", json={"amount": i * 100 + k},
                                     headers={"Idempotency-Key": f"sdk-{uuid.uuid4().hex}"}, timeout=30)
                except requests.RequestException:
                    return  # the sidecar died under this agent
                assert r.status_code == 201, r.text
                answers[(i, k)] = r.content

    threads = [threading.Thread(target=agent, args=(doomed, "a1", i, first)) for i in range(agents)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while http_api.books()["charges"] < agents * calls // 3:
        assert time.monotonic() < deadline, "the burst never got going"
        time.sleep(0.01)
    metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    doomed.kill()
    for t in threads:
        t.join()
    shared = [line for line in metrics.splitlines() if line.startswith("durable_journal_commit_writes_bucket")]
    alone = next(float(line.split()[-1]) for line in shared if 'le="1.0"' in line)
    total = next(float(line.split()[-1]) for line in shared if 'le="+Inf"' in line)
    assert total > alone, f"no two journal writes shared a commit: {shared}"
    assert len(first) < agents * calls, "the sidecar died after the burst: nothing was in flight"

    sidecar = sidecars.start()
    second: dict[tuple[int, int], bytes] = {}
    threads = [threading.Thread(target=agent, args=(sidecar, "a2", i, second)) for i in range(agents)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(second) == agents * calls
    assert all(second[key] == body for key, body in first.items()), "a delivered answer changed on resume"
    assert http_api.books()["charges"] == agents * calls  # nothing charged twice, nothing lost
    assert sql(pg_dsn, "SELECT count(*), bool_and(state = 'completed') FROM durable_steps WHERE run_id = ANY(%s)", runs) == [
        (agents * calls, True)
    ]


def test_identical_payment_in_doubt_deep_in_a_run_is_resent_as_its_own_occurrence(
    sidecars: Sidecars, http_api: PaidApi, pg_dsn: str
) -> None:
    """60 searches, then the same payment three times; the sidecar is SIGKILLed after the third was
    booked upstream, before its answer was journaled.

    On resume the run's index (digests of key and occurrence) matches the first two payments to
    their journaled answers and re-sends the third, the only one in doubt, with its own original
    key: no search or payment is charged twice, and a fourth identical payment is a new one.
    """
    run, searches = new_run(), 60

    def agent(sidecar: launcher.Sidecar, attempt: str, payments: int) -> list[requests.Response]:
        out = []
        with requests.Session() as session:
            session.trust_env = False
            session.proxies = {"http": sidecar.proxy_url(run, attempt)}
            try:
                for i in range(searches):
                    out.append(session.get(f"{http_api.url}/v1/search", params={"q": f"query {i}"}, timeout=30))
                for _ in range(payments):
                    out.append(session.post(f"{http_api.url}/v1/payments", json={"amount": 5},
                                            headers={"Idempotency-Key": f"sdk-{uuid.uuid4().hex}"}, timeout=30))
            except requests.ConnectionError:
                pass  # the sidecar died under this agent
        return out

    doomed = sidecars.start(env={**os.environ, "DURABLE_FAULT": f"before-complete-commit:{searches + 3}"})
    first = agent(doomed, "a1", payments=3)
    assert doomed.process.wait(10) == -9 and len(first) == searches + 2
    third_key = http_api.books()["requests"][-1]["headers"]["Idempotency-Key"]
    assert http_api.books()["charges"] == searches + 3  # every call is paid, the third payment too

    second = agent(sidecars.start(), "a2", payments=4)
    assert [r.headers["Durable-Outcome"] for r in second] == ["replayed"] * (searches + 2) + ["reissued", "recorded"]
    assert [r.content for r in second[: searches + 2]] == [r.content for r in first]
    books = http_api.books()
    assert books["charges"] == searches + 4 and books["deduplicated"] == 1
    assert books["requests"][-2]["headers"]["Idempotency-Key"] == third_key  # its own key, not the 1st's or 2nd's
    assert sql(pg_dsn, "SELECT array_agg(occurrence ORDER BY seq), bool_and(state = 'completed') FROM durable_steps"
                       " WHERE run_id = %s AND method = 'POST'", run) == [([0, 1, 2, 3], True)]
