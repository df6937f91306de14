"""Telemetry exporters pass through unjournaled (a built-in list, overridable), so their fresh ids and
timestamps never show as divergences; what an agent pays for is journaled as ever."""

from __future__ import annotations

import json
import uuid

import pytest
import requests

from conftest import PaidApi, Sidecars, new_run, sql

EXPORTS = ["/v1/traces/ingest", "/v1/traces", "/v1/logs", "/v1/metrics"]


def post(sidecar, run: str, attempt: str, url: str) -> requests.Response:
    body = {"trace_id": uuid.uuid4().hex, "spans": [{"ts": str(uuid.uuid4())}]}  # fresh on every attempt
    return requests.post(url, data=json.dumps(body), headers={"Content-Type": "application/json"},
                         proxies={"http": sidecar.proxy_url(run, attempt)}, timeout=30)


@pytest.mark.parametrize("path", EXPORTS)
def test_telemetry_passes_through_and_never_diverges(path: str, sidecars: Sidecars, http_api: PaidApi, pg_dsn: str) -> None:
    sidecar = sidecars.start(durable_strict=True)  # a divergence would be a 409
    run = new_run()
    for attempt in ("a1", "a2"):
        paid = requests.post(f"{http_api.url}/v1/echo", data=b"the paid call", proxies={"http": sidecar.proxy_url(run, attempt)},
                             timeout=30)
        exported = post(sidecar, run, attempt, f"{http_api.url}{path}")
        assert exported.headers["Durable-Outcome"] == "passthrough" and exported.status_code != 409
    assert paid.headers["Durable-Outcome"] == "replayed"
    assert sql(pg_dsn, "SELECT url FROM durable_steps WHERE run_id = %s", run) == [(f"{http_api.url}/v1/echo",)]


def test_the_builtin_list_can_be_turned_off_and_patterns_added(sidecars: Sidecars, http_api: PaidApi, pg_dsn: str) -> None:
    sidecar = sidecars.start(durable_builtin_ignores=False, durable_ignore_paths="127.0.0.1/telemetry/*")
    run = new_run()
    assert post(sidecar, run, "a1", f"{http_api.url}/v1/traces").headers["Durable-Outcome"] == "recorded"
    assert post(sidecar, run, "a1", f"{http_api.url}/telemetry/x?y=1").headers["Durable-Outcome"] == "passthrough"
    assert post(sidecar, run, "a1", f"{http_api.url}/telemetryx").headers["Durable-Outcome"] == "recorded"


def test_litellms_cost_map_fetch_is_on_the_builtin_list() -> None:
    """litellm GETs its model cost map from GitHub when it is imported: not the agent's call."""
    from durable_sidecar.steps import settings

    cost_map = "/BerriAI/litellm/main/model_prices_and_context_window.json"
    assert settings.DEFAULTS.ignored("raw.githubusercontent.com", cost_map)
    assert not settings.DEFAULTS.ignored("raw.githubusercontent.com", "/someone/else/main/data.json")
