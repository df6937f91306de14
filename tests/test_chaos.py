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
from pathlib import Path

import httpx
import pytest

from addon import faults, launcher
from conftest import PaidApi, Sidecars, new_run, run_agent, sql

STEPS = 3
CALLS = STEPS * 3
VICTIM = 6  # the 6th call: step 2's payment

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
