"""Operations: Prometheus metrics agree with a real crash-resume run, JSON logs, retention, compose file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import requests
from ruamel.yaml import YAML

from durable_sidecar.tools import launcher
from conftest import ROOT, PaidApi, Sidecars, eventually, runs_around_cutoff, new_run, run_agent, sql


def scrape(port: int) -> dict[str, float]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_metrics_agree_with_a_crash_resume_run(
    sidecars: Sidecars, ca_bundle: Path, https_api: PaidApi, fresh_dsn: str
) -> None:
    port = launcher.free_port()
    sidecar = sidecars.start(durable_metrics_listen=f"127.0.0.1:{port}", durable_dsn=fresh_dsn)  # in-doubt: this journal only
    run = new_run()
    code, _ = run_agent(sidecar, ca_bundle, https_api, run, "a1", steps=4, crash_after=6)  # crash after step 2
    assert code == -9
    code, _ = run_agent(sidecar, ca_bundle, https_api, run, "a2", steps=4)
    assert code == 0
    m = scrape(port)
    assert m['durable_steps_total{outcome="recorded"}'] == 12
    assert m['durable_steps_total{outcome="replayed"}'] == 6
    assert m['durable_steps_total{outcome="reissued"}'] == 0 and m['durable_steps_total{outcome="refused"}'] == 0
    assert m["durable_upstream_calls_avoided_total"] == 6
    assert m["durable_llm_tokens_avoided_total"] > 20  # two replayed completions report their usage
    assert m['durable_journal_write_seconds_count{statement="record pending step"}'] == 12
    assert m["durable_journal_errors_total"] == 0 and m["durable_in_doubt_steps"] == 0
    assert m["durable_divergences_total"] == 0


def test_json_logs_parse_and_hold_no_secret(sidecars: Sidecars, ca_bundle: Path, https_api: PaidApi) -> None:
    sidecar = sidecars.start(durable_log_json="true")
    run = new_run()
    run_agent(sidecar, ca_bundle, https_api, run, "a1", steps=1)
    lines = [json.loads(m.group(1)) for m in re.finditer(r"^\[[\d:.]+\] (\{.*\})$", sidecar.log(), re.M)]
    flows = [line for line in lines if line.get("run") == run]
    assert [(f["seq"], f["outcome"], f["attempt"]) for f in flows] == [(1, "recorded", "a1"), (2, "recorded", "a1"), (3, "recorded", "a1")]
    assert all(isinstance(f["ms"], float) and f["status"] in (200, 201) for f in flows)
    assert "sk-demo-not-a-real-key" not in sidecar.log()


def test_retention_deletes_idle_runs_and_keeps_live_ones(sidecars: Sidecars, http_api: PaidApi, pg_dsn: str) -> None:
    runs = runs_around_cutoff(sidecars.start(), http_api, pg_dsn, cutoff_days=7)
    sidecars.start(durable_retention="7d")  # its first retention pass runs at start
    count = lambda: sql(pg_dsn, "SELECT count(*) FROM durable_runs WHERE id = ANY(%s)", list(runs.values()))  # noqa: E731
    assert eventually(count, [(3,)]) == [(3,)]
    kept = {row[0] for row in sql(pg_dsn, "SELECT id FROM durable_runs WHERE id = ANY(%s)", list(runs.values()))}
    assert kept == {runs["inside"], runs["replayed"], runs["fresh"]}  # only the run idle past the cutoff went


def test_compose_file_names_what_the_readme_says() -> None:
    compose = YAML(typ="safe").load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "sidecar"}
    assert services["postgres"]["image"].startswith("postgres:") and "healthcheck" in services["postgres"]
    sidecar = services["sidecar"]
    assert sidecar["build"] == "." and (ROOT / "Dockerfile").exists()
    assert sidecar["ports"] == ["127.0.0.1:8080:8080"]
    assert "./certs:/certs" in sidecar["volumes"] and "healthcheck" in sidecar
    assert sidecar["environment"]["DATABASE_URL"].startswith("postgresql://") and "@postgres:5432/" in sidecar["environment"]["DATABASE_URL"]
    assert sidecar["depends_on"]["postgres"]["condition"] == "service_healthy"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "mitmdump" in dockerfile and "addon/durable.py" in dockerfile and "EXPOSE 8080" in dockerfile
    deployment = (ROOT / "docs" / "deployment.md").read_text()
    assert "docker compose up" in deployment and "127.0.0.1:8080" in deployment
