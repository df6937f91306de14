"""Identity, matching and replay fidelity through a real mitmdump sidecar and real clients."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import ssl
import threading
from pathlib import Path

import httpx
import pytest
import requests

from conftest import PaidApi, Sidecars, new_run, sql


def proxied(sidecar, run: str | None = None, attempt: str | None = None) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    auth = f"{run}:{attempt}@" if run else ""
    session.proxies = {"http": f"http://{auth}127.0.0.1:{sidecar.port}", "https": f"http://{auth}127.0.0.1:{sidecar.port}"}
    return session


def raw_get(sidecar, url: str, run: str, attempt: str, headers: dict[str, str] | None = None) -> tuple[int, list, bytes]:
    """GET through the proxy with http.client: header order, duplicates and raw body bytes as sent."""
    conn = http.client.HTTPConnection("127.0.0.1", sidecar.port, timeout=10)
    token = base64.b64encode(f"{run}:{attempt}".encode()).decode()
    conn.request("GET", url, headers={"Proxy-Authorization": f"Basic {token}", **(headers or {})})
    resp = conn.getresponse()
    result = resp.status, resp.getheaders(), resp.read()
    conn.close()
    return result


def without_durable(headers: list) -> list:
    return [(k, v) for k, v in headers if not k.lower().startswith("durable-")]


def test_replay_is_byte_identical_gzip_and_duplicate_headers(sidecars: Sidecars, http_api: PaidApi) -> None:
    sidecar = sidecars.start()
    run = new_run()
    url = f"{http_api.url}/v1/search?q=gzip"
    status1, headers1, body1 = raw_get(sidecar, url, run, "a1", {"Accept-Encoding": "gzip"})
    status2, headers2, body2 = raw_get(sidecar, url, run, "a2", {"Accept-Encoding": "gzip"})
    assert status1 == status2 == 200
    assert body1[:2] == b"\x1f\x8b" and body2 == body1  # still gzip, same bytes
    assert without_durable(headers2) == without_durable(headers1)
    assert [v for k, v in headers2 if k.lower() == "set-cookie"] == ["a=1", "b=2"]
    assert dict(headers1)["Durable-Outcome"] == "recorded" and dict(headers2)["Durable-Outcome"] == "replayed"
    assert http_api.books()["calls"] == 1


def test_chunked_origin_replays_with_content_length(sidecars: Sidecars, http_api: PaidApi) -> None:
    sidecar = sidecars.start()
    run = new_run()
    _, headers1, body1 = raw_get(sidecar, f"{http_api.url}/v1/chunked", run, "a1")
    _, headers2, body2 = raw_get(sidecar, f"{http_api.url}/v1/chunked", run, "a2")
    assert body2 == body1 and body1.count(b"chunked call 1") == 3
    assert int(dict(headers2)["content-length"]) == len(body2)
    assert "Transfer-Encoding" not in dict(headers2)
    assert http_api.books()["calls"] == 1


def test_identity_from_headers_overrides_credentials_and_never_leaks(
    sidecars: Sidecars, http_api: PaidApi, pg_dsn: str
) -> None:
    sidecar = sidecars.start()
    run, other = new_run(), new_run()
    session = proxied(sidecar, other, "cred-attempt")
    r = session.post(f"{http_api.url}/v1/payments", json={"amount": 3},
                     headers={"Durable-Run-Id": run, "Durable-Attempt": "h1", "Authorization": "Bearer sk-agent"})
    assert r.status_code == 201 and r.headers["Durable-Run-Id"] == run
    assert sql(pg_dsn, "SELECT attempt FROM durable_steps WHERE run_id = %s", run) == [("h1",)]
    assert sql(pg_dsn, "SELECT count(*) FROM durable_steps WHERE run_id = %s", other) == [(0,)]
    seen = http_api.books()["requests"][-1]["headers"]
    lowered = {k.lower(): v for k, v in seen.items()}
    assert not [k for k in lowered if k.startswith("durable-")]
    assert "proxy-authorization" not in lowered
    assert lowered["authorization"] == "Bearer sk-agent"  # the agent's own credentials go through
    assert lowered["idempotency-key"].startswith("durable-")


def test_https_credentials_hold_for_the_connection(sidecars: Sidecars, https_api: PaidApi, ca_bundle: Path) -> None:
    sidecar = sidecars.start()
    run = new_run()
    proxy = f"http://{run}:a1@127.0.0.1:{sidecar.port}"
    with httpx.Client(proxy=proxy, verify=ssl.create_default_context(cafile=str(ca_bundle)), trust_env=False) as client:
        for q in ("one", "two"):  # two requests on one tunnel
            r = client.get(f"{https_api.url}/v1/search", params={"q": q})
            assert r.headers["durable-run-id"] == run
    with httpx.Client(proxy=f"http://{run}:a2@127.0.0.1:{sidecar.port}", verify=ssl.create_default_context(cafile=str(ca_bundle)), trust_env=False) as client:
        outcomes = [client.get(f"{https_api.url}/v1/search", params={"q": q}).headers["durable-outcome"] for q in ("one", "two")]
    assert outcomes == ["replayed", "replayed"]
    assert https_api.books()["calls"] == 2


@pytest.mark.parametrize("bad", ["has space", "x" * 129, "semi;colon", "slash/run"])
def test_invalid_run_id_is_refused_and_nothing_forwarded(
    sidecars: Sidecars, http_api: PaidApi, pg_dsn: str, bad: str
) -> None:
    sidecar = sidecars.start()
    before = sql(pg_dsn, "SELECT count(*) FROM durable_steps")
    r = proxied(sidecar).post(f"{http_api.url}/v1/payments", json={"amount": 1}, headers={"Durable-Run-Id": bad})
    assert r.status_code == 400
    assert r.json()["error"] == "durable-sidecar" and "invalid run id" in r.json()["reason"]
    assert r.headers["Durable-Outcome"] == "refused"
    assert http_api.books()["calls"] == 0
    assert sql(pg_dsn, "SELECT count(*) FROM durable_steps") == before


def test_invalid_credentials_on_connect_are_refused(sidecars: Sidecars, https_api: PaidApi, ca_bundle: Path) -> None:
    sidecar = sidecars.start()
    with httpx.Client(proxy=f"http://bad%20run:a1@127.0.0.1:{sidecar.port}", verify=ssl.create_default_context(cafile=str(ca_bundle)), trust_env=False) as client:
        with pytest.raises(httpx.ProxyError, match="400"):
            client.get(f"{https_api.url}/v1/search", params={"q": "x"})
    assert https_api.books()["calls"] == 0


def test_repeated_identical_calls_are_distinct_steps(sidecars: Sidecars, http_api: PaidApi) -> None:
    sidecar = sidecars.start()
    run = new_run()
    first = [proxied(sidecar, run, "a1").get(f"{http_api.url}/v1/search", params={"q": "same"}).json()["call"] for _ in range(3)]
    second = [proxied(sidecar, run, "a2").get(f"{http_api.url}/v1/search", params={"q": "same"}).json()["call"] for _ in range(3)]
    assert first == [1, 2, 3] and second == first
    assert http_api.books()["calls"] == 3


def test_parallel_calls_in_another_order_on_resume(sidecars: Sidecars, http_api: PaidApi) -> None:
    sidecar = sidecars.start()
    run = new_run()
    queries = [f"q{i}" for i in range(8)]

    async def fire(attempt: str, order: list[str]) -> dict[str, int]:
        proxy = f"http://{run}:{attempt}@127.0.0.1:{sidecar.port}"
        async with httpx.AsyncClient(proxy=proxy, trust_env=False) as client:
            responses = await asyncio.gather(*(client.get(f"{http_api.url}/v1/search", params={"q": q}) for q in order))
        assert {r.headers["durable-outcome"] for r in responses} == ({"recorded"} if attempt == "a1" else {"replayed"})
        for q, r in zip(order, responses, strict=True):  # each request got its own answer, not a neighbour's
            assert r.json()["query"] == q
        return {q: r.json()["call"] for q, r in zip(order, responses, strict=True)}

    first = asyncio.run(fire("a1", queries))
    second = asyncio.run(fire("a2", list(reversed(queries))))
    assert second == first
    assert http_api.books()["calls"] == 8


def test_explicit_step_key_replaces_the_fingerprint(sidecars: Sidecars, http_api: PaidApi) -> None:
    sidecar = sidecars.start()
    run = new_run()
    headers = {"Durable-Step-Key": "pay-invoice-42"}
    r1 = proxied(sidecar, run, "a1").post(f"{http_api.url}/v1/payments", json={"amount": 5, "ts": 1}, headers=headers)
    r2 = proxied(sidecar, run, "a2").post(f"{http_api.url}/v1/payments", json={"amount": 5, "ts": 2}, headers=headers)
    assert r2.headers["Durable-Outcome"] == "replayed" and r2.content == r1.content
    assert http_api.books()["charges"] == 1


def test_divergence_is_recorded_and_logged(sidecars: Sidecars, http_api: PaidApi, pg_dsn: str) -> None:
    sidecar = sidecars.start()
    run = new_run()
    url = f"{http_api.url}/v1/chat/completions"
    a1 = proxied(sidecar, run, "a1")
    a1.post(url, json={"model": "m", "messages": [{"role": "user", "content": "hello at 10:00"}]})
    a1.post(url, json={"model": "m", "messages": [{"role": "user", "content": "second"}]})
    r = proxied(sidecar, run, "a2").post(url, json={"model": "m", "messages": [{"role": "user", "content": "hello at 10:05"}]})
    assert r.status_code == 200 and r.headers["Durable-Outcome"] == "diverged"
    assert r.headers["Durable-Step"] == "3"
    assert "/messages/0/content" in sidecar.log() and "divergence #1" in sidecar.log()
    assert sql(pg_dsn, "SELECT count(*) FROM durable_steps WHERE run_id = %s", run) == [(3,)]


def test_strict_divergence_answers_409_with_the_diff(sidecars: Sidecars, http_api: PaidApi, pg_dsn: str) -> None:
    sidecar = sidecars.start(durable_strict=True)
    run = new_run()
    url = f"{http_api.url}/v1/chat/completions"
    proxied(sidecar, run, "a1").post(url, json={"model": "m", "messages": [{"role": "user", "content": "at 10:00"}]})
    r = proxied(sidecar, run, "a2").post(url, json={"model": "m", "messages": [{"role": "user", "content": "at 10:05"}]})
    assert r.status_code == 409
    body = r.json()
    assert body["expected_step"] == 1
    assert body["diff"] == [{"field": "body/messages/0/content", "journaled": "at 10:00", "now": "at 10:05"}]
    assert http_api.books()["calls"] == 1
    assert sql(pg_dsn, "SELECT count(*) FROM durable_steps WHERE run_id = %s", run) == [(1,)]


def test_slow_call_of_one_agent_does_not_delay_another(sidecars: Sidecars, http_api: PaidApi) -> None:
    sidecar = sidecars.start()
    slow_done = threading.Event()

    def slow() -> None:
        proxied(sidecar, new_run(), "a1").get(f"{http_api.url}/v1/slow", params={"ms": 4000})
        slow_done.set()

    thread = threading.Thread(target=slow)
    thread.start()
    fast = proxied(sidecar, new_run(), "a1")
    for i in range(10):
        r = fast.post(f"{http_api.url}/v1/payments", json={"amount": i})
        assert r.status_code == 201
    assert not slow_done.is_set()  # ten journaled calls went through while the slow one was held
    thread.join()
    assert slow_done.is_set()


def test_journal_view_answers_the_seed_query(sidecars: Sidecars, http_api: PaidApi, pg_dsn: str) -> None:
    sidecar = sidecars.start()
    run = new_run()
    proxied(sidecar, run, "a1").post(f"{http_api.url}/v1/payments", json={"amount": 7})
    rows = sql(pg_dsn, "SELECT step_id, request_hash, response_body, completed_at FROM journal WHERE run_id = %s", run)
    assert len(rows) == 1
    step_id, request_hash, response_body, completed_at = rows[0]
    assert step_id == 1 and request_hash.startswith("v2:") and completed_at is not None
    assert response_body["amount"] == 7 and response_body["status"] == "succeeded"
    json.dumps(response_body)


def test_run_from_options_when_the_agent_names_none(sidecars: Sidecars, http_api: PaidApi, pg_dsn: str) -> None:
    run = new_run()
    sidecar = sidecars.start(durable_run=run)
    r = proxied(sidecar).get(f"{http_api.url}/v1/search", params={"q": "anonymous agent"})
    assert r.headers["Durable-Run-Id"] == run
    (attempt,), = sql(pg_dsn, "SELECT attempt FROM durable_steps WHERE run_id = %s", run)
    assert attempt.startswith("attempt-")  # the proxy's lifetime


def test_generated_run_id_is_logged(sidecars: Sidecars, http_api: PaidApi) -> None:
    sidecar = sidecars.start()
    r = proxied(sidecar).get(f"{http_api.url}/v1/search", params={"q": "no id at all"})
    assert r.headers["Durable-Run-Id"].startswith("run-")
    assert f"go to run {r.headers['Durable-Run-Id']}" in sidecar.log()
