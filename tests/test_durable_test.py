"""`durable test`: a run recorded into a fixture file and replayed offline to the agent, as a test
(tools/testing.py, tools/fixture.py, pytest_plugin.py). Real processes throughout: `durable` and
the agent (tests/agents/fixture_agent.py: the openai SDK, plain and streamed, requests, a WebSocket
turn, an MCP tool call through the mcp SDK) against local upstreams that count every request."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PaidApi, env_without_proxy, new_run

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
import ws_api  # noqa: E402
from test_compat import McpServer  # noqa: E402

DURABLE = str(Path(sys.executable).with_name("durable"))
AGENT = Path(__file__).parent / "agents" / "fixture_agent.py"
PLANTED = "sk-planted-7f3a9c1e5b2d4f60"  # the agent's API key: it must not appear in a fixture


@pytest.fixture(scope="module")
def ws_server() -> Iterator[ws_api.Server]:
    server = ws_api.Server()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mcp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[McpServer]:
    server = McpServer(tmp_path_factory.mktemp("mcp"), "stateless")
    server.start()
    yield server
    server.stop()


class Upstreams:
    """Every upstream the agent calls, and how many requests each has had."""

    def __init__(self, api: PaidApi, ws: ws_api.Server, mcp: McpServer) -> None:
        self.api, self.ws, self.mcp = api, ws, mcp

    def agent(self) -> list[str]:
        return [sys.executable, str(AGENT), self.api.url, f"{self.ws.url}/v1/responses", f"http://127.0.0.1:{self.mcp.port}/mcp"]

    def requests(self) -> tuple[int, int, int]:
        return (self.api.books()["calls"], ws_api.LEDGER.books()["calls"], len(self.mcp.ledger.read_text().split()))


@pytest.fixture
def upstreams(_https_api: PaidApi, ws_server: ws_api.Server, mcp_server: McpServer) -> Upstreams:
    return Upstreams(_https_api, ws_server, mcp_server)


def durable(args: list[str], upstreams: Upstreams, dsn: str, confdir: Path, variant: str = "",
            extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`durable ARGS -- the agent`, its key planted, changed by `variant`."""
    env = env_without_proxy(OPENAI_API_KEY=PLANTED, VARIANT=variant, **(extra_env or {}))
    argv = [DURABLE, *args, "--dsn", dsn, "--confdir", str(confdir), "--upstream-ca", str(upstreams.api.ca),
            "--", *upstreams.agent()]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory, _https_api: PaidApi, ws_server: ws_api.Server,
              mcp_server: McpServer, pg_dsn: str, confdir: Path) -> Path:
    """One live run of the agent, recorded into a fixture by `durable test --record`."""
    path = tmp_path_factory.mktemp("fixtures") / "agent.jsonl"
    done = durable(["test", "--record", str(path)], Upstreams(_https_api, ws_server, mcp_server), pg_dsn, confdir)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tool: charged 7" in done.stdout and f"recorded {len(steps_of(path))} steps" in done.stderr
    return path


def steps_of(path: Path) -> list[dict]:
    return [doc for doc in map(json.loads, path.read_text().splitlines()) if "seq" in doc]


def test_a_recorded_run_replays_offline_with_no_upstream_request_and_no_secret_in_the_file(
    recording: Path, upstreams: Upstreams, pg_dsn: str, confdir: Path, tmp_path: Path
) -> None:
    """The fixture holds every kind of call (plain and streamed completions, a GET, a WebSocket turn,
    MCP's JSON-RPC), none of them with the planted key in clear; replayed, the agent passes with the
    upstreams untouched, and the JUnit file has one passing case."""
    steps = steps_of(recording)
    methods = {(s["method"], s.get("streamed", False)) for s in steps}
    assert {("POST", False), ("POST", True), ("GET", False), ("WS", False)} <= methods, methods
    assert any('"tools/call"' in (doc.get("text") or "") for doc in map(json.loads, recording.read_text().splitlines()))
    assert PLANTED not in recording.read_text() and PLANTED[3:] not in recording.read_text()
    before = upstreams.requests()
    junit = tmp_path / "junit.xml"
    done = durable(["test", str(recording), "--junit", str(junit)], upstreams, pg_dsn, confdir)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f": passed: {len(steps)} of {len(steps)} recorded calls answered from the recording" in done.stderr
    assert upstreams.requests() == before  # nothing reached any upstream
    case = ET.parse(junit).getroot().find("testcase")
    assert case is not None and case.find("failure") is None


@pytest.mark.parametrize(("variant", "first"), [
    ("extra", "call GET {api}/v1/search?q=one+more instead of recorded step"),
    ("fewer", "was never made"),
    ("different", "call POST {api}/v1/chat/completions instead of recorded step 1 is not in the recording"),
])
def test_an_agent_that_changed_fails_with_the_first_divergence_and_no_upstream_request(
    recording: Path, upstreams: Upstreams, pg_dsn: str, confdir: Path, tmp_path: Path, variant: str, first: str
) -> None:
    """One more call, one fewer, or a different request: exit 1, a report naming the first
    divergence (for the changed request, the field that changed), a JUnit failure and a JSON
    report, and still no request upstream."""
    before = upstreams.requests()
    junit, report = tmp_path / "junit.xml", tmp_path / "report.json"
    done = durable(["test", str(recording), "--junit", str(junit), "--json", str(report)], upstreams, pg_dsn,
                   confdir, variant=variant)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED" in done.stderr and first.format(api=upstreams.api.url) in done.stderr, done.stderr
    assert upstreams.requests() == before
    failure = ET.parse(junit).getroot().find("testcase/failure")
    assert failure is not None and "first divergence" in (failure.text or "")
    result = json.loads(report.read_text())
    assert result["passed"] is False and result["first_divergence"]
    if variant == "different":
        assert '/messages/0/content: "plan a trip" -> "plan a holiday"' in done.stderr
        assert [d["field"] for d in result["extra"][0]["diff"]] == ["body/messages/0/content"]
    if variant == "fewer":
        assert result["extra"] == [] and all(c["method"] == "POST" for c in result["missing"])


def test_a_run_journaled_by_durable_run_exports_to_a_fixture_that_replays(
    upstreams: Upstreams, pg_dsn: str, confdir: Path, tmp_path: Path
) -> None:
    """`durable run` journals a run; `durable export RUN --fixture` writes it; `durable test` replays it
    with nothing upstream; `durable import` reads it back as a run."""
    run = new_run()
    done = durable(["run", "--run", run], upstreams, pg_dsn, confdir)
    assert done.returncode == 0, done.stderr
    path = tmp_path / "exported.jsonl"
    env = env_without_proxy()
    exported = subprocess.run([DURABLE, "export", run, "--fixture", str(path), "--dsn", pg_dsn], env=env,
                              capture_output=True, text=True, timeout=60)
    assert exported.returncode == 0, exported.stderr
    before = upstreams.requests()
    replayed = durable(["test", str(path)], upstreams, pg_dsn, confdir)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert upstreams.requests() == before
    imported = subprocess.run([DURABLE, "import", str(path), "--run", new_run(), "--dsn", pg_dsn], env=env,
                              capture_output=True, text=True, timeout=60)
    assert imported.returncode == 0 and f"imported {len(steps_of(path))} steps" in imported.stdout, imported.stderr


def test_new_episodes_adds_what_the_fixture_lacks_and_live_after_divergence_pays_without_writing(
    recording: Path, upstreams: Upstreams, pg_dsn: str, confdir: Path, tmp_path: Path
) -> None:
    """--record-mode new_episodes: the extra call goes live (one search upstream) and joins the
    fixture, which then replays the changed agent offline. --live-after-divergence: the changed
    request goes live and is paid, the report still says where the agent left the recording, exit 1,
    and the fixture is untouched."""
    path = tmp_path / "agent.jsonl"
    shutil.copy(recording, path)
    before = upstreams.requests()
    grown = durable(["test", str(path), "--record-mode", "new_episodes"], upstreams, pg_dsn, confdir, variant="extra")
    assert grown.returncode == 0, grown.stdout + grown.stderr
    assert upstreams.requests() == (before[0] + 1, before[1], before[2])
    assert len(steps_of(path)) == len(steps_of(recording)) + 1
    again = durable(["test", str(path)], upstreams, pg_dsn, confdir, variant="extra")
    assert again.returncode == 0, again.stderr

    text = recording.read_text()
    live = durable(["test", str(recording), "--live-after-divergence"], upstreams, pg_dsn, confdir, variant="different")
    assert live.returncode == 1 and "(sent live)" in live.stderr and "first divergence" in live.stderr, live.stderr
    assert upstreams.requests()[0] == before[0] + 2  # the changed completion, paid
    assert recording.read_text() == text


def test_an_encrypted_recording_stays_sealed_in_the_file_and_replays_with_its_key(
    upstreams: Upstreams, pg_dsn: str, confdir: Path, tmp_path: Path
) -> None:
    """With an encryption key the fixture holds bodies and headers sealed (the prompt is nowhere in
    clear); the replay opens them with the same key and passes offline."""
    key = subprocess.run([DURABLE, "keygen"], capture_output=True, text=True, check=True).stdout.strip()
    path = tmp_path / "sealed.jsonl"
    sealed = {"DURABLE_ENCRYPTION_KEY": key}
    recorded = durable(["test", "--record", str(path)], upstreams, pg_dsn, confdir, extra_env=sealed)
    assert recorded.returncode == 0, recorded.stderr
    assert "plan a trip" not in path.read_text() and PLANTED not in path.read_text()
    before = upstreams.requests()
    replayed = durable(["test", str(path)], upstreams, pg_dsn, confdir, extra_env=sealed)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert upstreams.requests() == before


PLUGGED_TEST = '''
import os, requests, pytest

@pytest.mark.durable("fixtures/search.jsonl")
def test_search(durable):
    api = os.environ["PAID_API"]
    found = requests.get(f"{api}/v1/search", params={"q": os.environ.get("QUERY", "paris")})
    assert found.status_code == 200
    assert requests.post(f"{api}/v1/payments", json={"amount": 3}).status_code == 201
'''


def test_the_pytest_plugin_records_a_missing_fixture_then_replays_it_and_fails_a_changed_request(
    upstreams: Upstreams, pg_dsn: str, tmp_path: Path
) -> None:
    """A test marked @pytest.mark.durable(FILE) using the `durable` fixture: the first run records
    FILE (live), the second passes on it with nothing upstream, and a changed request fails the test
    with durable test's report."""
    (tmp_path / "test_plugged.py").write_text(PLUGGED_TEST)
    fixture = tmp_path / "fixtures" / "search.jsonl"
    fixture.parent.mkdir()

    def pytest_run(**env: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", str(tmp_path),
                "--durable-dsn", pg_dsn, "--durable-set", f"ssl_verify_upstream_trusted_ca={upstreams.api.ca}"]
        return subprocess.run(argv, env=env_without_proxy(PAID_API=upstreams.api.url, **env), cwd=tmp_path,
                              capture_output=True, text=True, timeout=180)

    first = pytest_run()
    assert first.returncode == 0 and fixture.exists(), first.stdout
    before = upstreams.requests()
    second = pytest_run()
    assert second.returncode == 0 and "1 passed" in second.stdout, second.stdout
    changed = pytest_run(QUERY="london")
    assert changed.returncode == 1 and 'query.q: "paris" -> "london"' in changed.stdout, changed.stdout
    assert upstreams.requests() == before
    assert os.environ.get("HTTPS_PROXY") is None  # the plugin's variables stayed inside its tests
