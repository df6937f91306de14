"""Zero-code GenAI traces (proxy/tracing.py, matching/genai.py): a sidecar started with the standard
OTEL_EXPORTER_OTLP_ENDPOINT exports a span per step to a real OTLP/HTTP receiver
(scripts/otlp_receiver.py, opentelemetry-proto decoding the protobuf), where exact attributes are
asserted. Real processes: the sidecar, the paid API, the openai SDK and requests as clients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from openai import OpenAI

from conftest import PaidApi, Sidecars, new_run

from durable_sidecar.tools import launcher

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
from otlp_receiver import Receiver  # noqa: E402


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.stop()


def spans_where(receiver: Receiver, run: str, count: int, timeout: float = 20) -> list[dict[str, Any]]:
    """The run's step spans (not the attempts' roots), once `count` of them have arrived."""
    deadline = time.monotonic() + timeout
    while True:
        found = [s for s in receiver.spans() if s["attributes"].get("durable.run_id") == run and "durable.step" in s["attributes"]]
        if len(found) >= count or time.monotonic() > deadline:
            return sorted(found, key=lambda s: s["start_ns"])
        time.sleep(0.1)


def llm(sidecar, run: str, attempt: str, api: PaidApi, ca_bundle: Path) -> OpenAI:
    client = httpx.Client(proxy=sidecar.proxy_url(run, attempt), verify=str(ca_bundle))
    return OpenAI(base_url=f"{api.url}/v1", api_key="sk-test", http_client=client, max_retries=0)


def agent(sidecar, run: str, attempt: str, api: PaidApi, ca_bundle: Path) -> None:
    """A chat completion, a streamed one, and a search: what the spans describe."""
    client = llm(sidecar, run, attempt, api, ca_bundle)
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], temperature=0.2,
                                   max_tokens=64)
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "go on"}],
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    proxies = {"https": sidecar.proxy_url(run, attempt)}
    assert requests.get(f"{api.url}/v1/search?q=x", proxies=proxies, verify=str(ca_bundle), timeout=30).ok


def test_every_step_is_a_span_with_its_genai_attributes_and_a_resume_is_marked_saved(
    sidecars: Sidecars, https_api: PaidApi, ca_bundle: Path, receiver: Receiver
) -> None:
    """Attempt 1 records three calls, attempt 2 replays them: six CLIENT spans with run, attempt,
    step and outcome; the completions named `chat MODEL` with model, request parameters, response
    id, finish reasons and usage (streamed too); the replayed ones carry their tokens as saved
    (durable.saved.*), not as gen_ai.usage.*, so a cost view does not count the resume twice. Each
    attempt is its own trace under an `attempt` root span."""
    sidecar = sidecars.start(env={**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
                                  "OTEL_SERVICE_NAME": "trip-agent"})
    run = new_run()
    agent(sidecar, run, "a1", https_api, ca_bundle)
    agent(sidecar, run, "a2", https_api, ca_bundle)
    spans = spans_where(receiver, run, 6)
    assert "a span per step exported over OTLP/HTTP" in sidecar.log()
    assert [(s["attributes"]["durable.attempt"], s["attributes"]["durable.outcome"]) for s in spans] == [
        ("a1", "recorded")] * 3 + [("a2", "replayed")] * 3
    chat, streamed, search = spans[:3]
    assert chat["name"] == "chat gpt-4o" and chat["kind"] == 3  # SPAN_KIND_CLIENT
    assert chat["resource"]["service.name"] == "trip-agent"
    a = chat["attributes"]
    assert {k: a[k] for k in ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model",
                              "gen_ai.request.temperature", "gen_ai.request.max_tokens", "gen_ai.response.model",
                              "gen_ai.response.finish_reasons", "gen_ai.usage.input_tokens",
                              "gen_ai.usage.output_tokens", "http.response.status_code", "durable.step")} == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
        "gen_ai.request.temperature": 0.2, "gen_ai.request.max_tokens": 64, "gen_ai.response.model": "gpt-4o",
        "gen_ai.response.finish_reasons": ["stop"], "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 8, "http.response.status_code": 200, "durable.step": 1}
    assert a["gen_ai.response.id"].startswith("chatcmpl-") and a["url.full"].endswith("/v1/chat/completions")
    assert "gen_ai.input.messages" not in a and "gen_ai.output.messages" not in a  # contents: opt-in only
    s = streamed["attributes"]
    assert streamed["name"] == "chat gpt-4o-mini" and s["gen_ai.response.finish_reasons"] == ["stop"]
    assert s["gen_ai.usage.input_tokens"] == 12 and s["gen_ai.usage.output_tokens"] > 0
    assert s["durable.time_to_first_byte_ms"] > 0
    assert search["name"] == f"GET {https_api.url.split('//')[1].split(':')[0]}"
    assert not any(k.startswith("gen_ai.") for k in search["attributes"])
    replayed = spans[3]["attributes"]
    assert "gen_ai.usage.input_tokens" not in replayed
    assert (replayed["durable.saved.input_tokens"], replayed["durable.saved.output_tokens"]) == (12, 8)
    roots = {s["trace_id"]: s for s in receiver.spans() if s["name"].startswith("attempt ")}
    assert {roots[s["trace_id"]]["name"] for s in spans} == {"attempt a1", "attempt a2"}
    assert all(s["parent_span_id"] == roots[s["trace_id"]]["span_id"] for s in spans)


def test_an_agents_traceparent_makes_the_step_its_child(
    sidecars: Sidecars, https_api: PaidApi, ca_bundle: Path, receiver: Receiver
) -> None:
    sidecar = sidecars.start(env={**os.environ, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{receiver.url}/v1/traces"})
    run, trace_id, parent = new_run(), "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    proxies = {"https": sidecar.proxy_url(run, "a1")}
    answer = requests.get(f"{https_api.url}/v1/search?q=t", proxies=proxies, verify=str(ca_bundle), timeout=30,
                          headers={"traceparent": f"00-{trace_id}-{parent}-01"})
    assert answer.ok
    [span] = spans_where(receiver, run, 1)
    assert (span["trace_id"], span["parent_span_id"]) == (trace_id, parent)


def test_an_mcp_tool_call_is_an_execute_tool_span(
    sidecars: Sidecars, https_api: PaidApi, ca_bundle: Path, receiver: Receiver
) -> None:
    sidecar = sidecars.start(env={**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url})
    run = new_run()
    session = requests.Session()
    session.trust_env = False  # NO_PROXY may name 127.0.0.1
    session.proxies, session.verify = {"https": sidecar.proxy_url(run, "a1")}, str(ca_bundle)
    headers = {"Accept": "application/json, text/event-stream"}
    opened = session.post(f"{https_api.url}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "initialize"},
                          headers=headers, timeout=30)
    headers["Mcp-Session-Id"] = opened.headers["Mcp-Session-Id"]
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "charge", "arguments": {"n": 1}}}
    assert session.post(f"{https_api.url}/mcp", json=call, headers=headers, timeout=30).ok
    tool = spans_where(receiver, run, 2)[1]
    assert tool["name"] == "execute_tool charge"
    assert {k: tool["attributes"][k] for k in ("gen_ai.operation.name", "gen_ai.tool.name", "mcp.method.name",
                                               "jsonrpc.request.id", "mcp.session.id")} == {
        "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "charge", "mcp.method.name": "tools/call",
        "jsonrpc.request.id": "2", "mcp.session.id": headers["Mcp-Session-Id"]}


def test_a_collector_that_is_down_costs_the_agent_nothing_and_the_drops_are_counted(
    sidecars: Sidecars, https_api: PaidApi, ca_bundle: Path
) -> None:
    """The endpoint refuses connections: every call is answered as ever, and the spans that could
    not be exported are counted in durable_otlp_spans_dropped."""
    closed, metrics = launcher.free_port(), launcher.free_port()
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{closed}",
           "OTEL_EXPORTER_OTLP_TIMEOUT": "1"}
    sidecar = sidecars.start(env=env, durable_metrics_listen=f"127.0.0.1:{metrics}")
    run = new_run()
    proxies = {"https": sidecar.proxy_url(run, "a1")}
    for n in range(5):
        answer = requests.get(f"{https_api.url}/v1/search?q={n}", proxies=proxies, verify=str(ca_bundle), timeout=30)
        assert answer.status_code == 200 and answer.headers["Durable-Outcome"] == "recorded"

    def dropped() -> float:
        text = requests.get(f"http://127.0.0.1:{metrics}/metrics", timeout=5).text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("durable_otlp_spans_dropped_total"))

    deadline = time.monotonic() + 30
    while dropped() < 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert dropped() >= 5  # the 5 steps (and the attempt's root)


PHOENIX = Path(os.environ.get("DURABLE_PHOENIX") or Path(__file__).parent.parent / ".venv-phoenix" / "bin" / "phoenix")


@pytest.fixture
def phoenix(tmp_path: Path) -> Iterator[str]:
    """Arize Phoenix serving its UI and OTLP/HTTP receiver on a free port, its data in tmp_path."""
    if not PHOENIX.exists():
        pytest.skip("Arize Phoenix is not installed: scripts/phoenix.sh puts it in .venv-phoenix (CI runs it)")
    port, grpc = launcher.free_port(), launcher.free_port()
    env = {**os.environ, "PHOENIX_PORT": str(port), "PHOENIX_GRPC_PORT": str(grpc), "PHOENIX_HOST": "127.0.0.1",
           "PHOENIX_WORKING_DIR": str(tmp_path / "phoenix")}
    log = (tmp_path / "phoenix.log").open("wb")
    server = subprocess.Popen([str(PHOENIX), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(f"{url}/healthz", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "phoenix.log").read_text()[-3000:]
            time.sleep(0.5)
        yield url
    finally:
        server.kill()
        server.wait()


def phoenix_spans(url: str, run: str, count: int) -> list[dict[str, Any]]:
    """The run's step spans as Phoenix stores them (its REST API), attributes as plain values."""
    deadline = time.monotonic() + 30
    while True:
        data = requests.get(f"{url}/v1/projects/default/spans/otlpv1", params={"limit": 1000}, timeout=10).json()["data"]
        spans = []
        for span in data:
            attrs = {a["key"]: next((v for v in a["value"].values() if v is not None), None) for a in span["attributes"]}
            if attrs.get("durable.run_id") == run and "durable.step" in attrs:
                spans.append({"name": span["name"], "attributes": attrs})
        if len(spans) >= count or time.monotonic() > deadline:
            return spans
        time.sleep(0.5)


def test_arize_phoenix_shows_the_agents_llm_calls_and_what_the_resume_saved(
    sidecars: Sidecars, https_api: PaidApi, ca_bundle: Path, phoenix: str
) -> None:
    """A real tracing backend: Phoenix receives the spans over OTLP/HTTP and stores them with their
    GenAI attributes; the resumed attempt's completions are there as replayed, their tokens saved."""
    sidecar = sidecars.start(env={**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": phoenix})
    run = new_run()
    agent(sidecar, run, "a1", https_api, ca_bundle)
    agent(sidecar, run, "a2", https_api, ca_bundle)
    spans = phoenix_spans(phoenix, run, 6)
    by_name: dict[tuple[str, str], dict[str, Any]] = {(s["name"], s["attributes"]["durable.outcome"]): s for s in spans}
    recorded, replayed = by_name[("chat gpt-4o", "recorded")]["attributes"], by_name[("chat gpt-4o", "replayed")]["attributes"]
    assert (recorded["gen_ai.request.model"], recorded["gen_ai.usage.input_tokens"]) == ("gpt-4o", 12)
    assert recorded["gen_ai.usage.output_tokens"] == 8 and recorded["durable.attempt"] == "a1"
    assert replayed["durable.saved.input_tokens"] == 12 and "gen_ai.usage.input_tokens" not in replayed
    assert ("chat gpt-4o-mini", "replayed") in by_name


def test_a_websocket_message_of_the_responses_api_is_a_chat_span(
    sidecars: Sidecars, ca_bundle: Path, receiver: Receiver
) -> None:
    """Each WebSocket message is a step and a span: a Responses API `response.create` is named
    `chat MODEL`, with the response's id, status and usage read from the server's events."""
    from test_websocket import converse, turn

    import ws_api

    server = ws_api.Server()
    try:
        sidecar = sidecars.start(env={**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url})
        run = new_run()
        [answer] = converse(f"{server.url}/v1/responses", sidecar, "a1", run, ca_bundle, [turn(1)])
        completed = json.loads(answer[-1])
        assert completed["type"] == "response.completed"
    finally:
        server.stop()
    message = next(s for s in spans_where(receiver, run, 2) if s["attributes"].get("durable.websocket.message"))
    assert message["name"] == "chat m"
    assert {k: message["attributes"][k] for k in ("gen_ai.operation.name", "gen_ai.response.id",
                                                  "gen_ai.response.finish_reasons", "gen_ai.usage.input_tokens",
                                                  "gen_ai.usage.output_tokens")} == {
        "gen_ai.operation.name": "chat", "gen_ai.response.id": completed["response"]["id"],
        "gen_ai.response.finish_reasons": ["completed"],
        "gen_ai.usage.input_tokens": 10, "gen_ai.usage.output_tokens": 5}


@pytest.mark.parametrize("sealed", [False, True], ids=["redacted", "encrypted"])
def test_message_contents_only_when_opted_in_and_never_what_the_journal_hides(
    sidecars: Sidecars, https_api: PaidApi, ca_bundle: Path, receiver: Receiver, sealed: bool
) -> None:
    """With OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true the chat span carries the prompt
    and the answer, the field durable_redact_json hides as its keyed hash only; with an encryption
    key (the journal sealed at rest) no content at all. (Without the switch: the first test.)"""
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
           "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true"}
    if sealed:
        env["DURABLE_ENCRYPTION_KEY"] = subprocess.run([str(Path(sys.executable).with_name("durable")), "keygen"],
                                                       capture_output=True, text=True, check=True).stdout.strip()
    sidecar = sidecars.start(env=env, durable_redact_json="/messages/1/content")
    run = new_run()
    client = llm(sidecar, run, "a1", https_api, ca_bundle)
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "system", "content": "be brief"},
                                                             {"role": "user", "content": "my card is 4242"}])
    [span] = spans_where(receiver, run, 1)
    attrs = span["attributes"]
    if sealed:
        assert not any(k in attrs for k in ("gen_ai.input.messages", "gen_ai.output.messages"))
        assert attrs["gen_ai.usage.input_tokens"] == 12  # the counters still go out
        return
    # the request's field as the journal stores it: hashed (the fake model's answer echoes it, as stored)
    assert "4242" not in attrs["gen_ai.input.messages"] and "redacted:hmac-sha256:" in attrs["gen_ai.input.messages"]
    assert json.loads(attrs["gen_ai.system_instructions"]) == [{"type": "text", "content": "be brief"}]
    assert json.loads(attrs["gen_ai.output.messages"])[0]["role"] == "assistant"
