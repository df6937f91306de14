"""Exactly-once when a connection fails, not a process (issue 24, DESIGN.md section 3.10).

Each scenario of scripts/connection_failures.py (which runs them 20 times for docs/steps.md's
table) runs once here, on an endpoint that honours Idempotency-Key and one that ignores it: real
sidecars, `durable run`, agents, and a TCP relay between the sidecar and PostgreSQL
(scripts/relay.py) that cuts, freezes or loses replies; the paid API's books judge. Below them, what
a frozen link does to /health and to replays the sidecar can serve from memory.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

import agent_failures
import connection_failures
from conftest import PaidApi, Sidecars, new_run
from durable_sidecar.tools import launcher
from relay import Relay


@pytest.mark.parametrize("endpoint", sorted(connection_failures.ENDPOINTS))
@pytest.mark.parametrize("scenario", list(connection_failures.SCENARIOS))
def test_no_second_charge_no_lost_answer_no_stuck_step(
    scenario: str, endpoint: str, tmp_path: Path, https_api: PaidApi, pg_server: str, confdir: Path
) -> None:
    rig = agent_failures.Rig(tmp_path, https_api.url, https_api.ca, pg_server, confdir)
    result = connection_failures.run_once(rig, scenario, endpoint)
    found = (result.double_charges, result.resends, result.wrong_answers, result.lost_answers, result.stuck_steps)
    assert found == (0, 0, 0, 0, 0), result.notes
    assert result.longest_wait_s <= connection_failures.BOUND_S


@pytest.fixture
def relayed(fresh_dsn: str) -> Iterator[tuple[Relay, str]]:
    relay, dsn = Relay.for_dsn(fresh_dsn)
    yield relay, dsn
    relay.close()


def post(sidecar: launcher.Sidecar, run: str, attempt: str, url: str, body: dict, timeout: float = 60) -> requests.Response:
    return requests.post(url, json=body, timeout=timeout, proxies={"http": sidecar.proxy_url(run, attempt)})


def health(sidecar: launcher.Sidecar) -> requests.Response:
    return requests.get("http://durable.sidecar/health", timeout=30,
                        proxies={"http": f"http://127.0.0.1:{sidecar.port}"})


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
