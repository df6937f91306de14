"""The compatibility suite: real agent SDKs, unmodified, under `durable run`, against local fake
upstreams that bill every call. Each agent is SIGKILLed right after its paid tool call and run
again with `durable run`: the resumed run must cost nothing extra upstream (model calls, tool
charges), end with the output an uninterrupted run gives, and record no divergence. The MCP rows
restart the MCP server between the attempts, as a redeploy would.

`scripts/compat_table.py` runs this file and writes the README's "Works with" table from it."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from conftest import PaidApi, env_without_proxy, new_run, sql

DURABLE = str(Path(sys.executable).with_name("durable"))
AGENTS = Path(__file__).parent / "agents"
NODE = AGENTS / "node"
SCRIPTS = Path(__file__).parent.parent / "scripts"


@dataclass(frozen=True)
class Stack:
    """One row of the table: the agent (a script in tests/agents and its arguments), the
    packages it exercises (for the table), and what an uninterrupted run costs."""

    name: str
    agent: tuple[str, ...]
    packages: tuple[str, ...]
    model_calls: int = 2  # a tool call, then the final answer
    mcp: str | None = None  # the MCP server's mode, for the MCP rows
    node: bool = False  # a Node agent in tests/agents/node (npm packages, pinned in its package.json)

    def command(self, mcp_url: str) -> list[str]:
        agent = [a.format(mcp=mcp_url) for a in self.agent]
        if self.node:  # Node 20's fetch ignores HTTPS_PROXY: docs/cli.md's undici preload
            return ["node", "--import", str(NODE / "durable-proxy.mjs"), str(NODE / agent[0]), *agent[1:]]
        return [sys.executable, str(AGENTS / agent[0]), *agent[1:]]


STACKS = [
    Stack("openai-agents, Chat Completions", ("openai_agents_agent.py", "chat"), ("openai-agents", "openai")),
    Stack("openai-agents, Responses API over HTTP", ("openai_agents_agent.py", "responses"), ("openai-agents", "openai")),
    Stack("openai-agents, Responses API over WebSocket", ("openai_agents_agent.py", "websocket"),
          ("openai-agents", "websockets")),
    Stack("LangGraph ReAct agent, langchain-openai", ("langgraph_agent.py",), ("langgraph", "langchain-openai")),
    Stack("anthropic, messages.create tool use", ("anthropic_agent.py",), ("anthropic",)),
    Stack("pydantic-ai, OpenAIChatModel with a tool", ("pydantic_ai_agent.py",), ("pydantic-ai-slim", "openai")),
    Stack("aiohttp (trust_env=True), Chat Completions by hand", ("aiohttp_agent.py",), ("aiohttp",)),
    Stack("litellm, completion() with tools", ("litellm_agent.py",), ("litellm",)),
    Stack("websockets client, Responses API frames", ("websockets_agent.py",), ("websockets",)),
    Stack("Node: the npm openai package, its fetch through undici", ("openai_agent.mjs",), ("openai", "undici"),
          node=True),
    Stack("Node: Vercel's AI SDK, generateText with a tool", ("vercel_ai_agent.mjs",), ("ai", "@ai-sdk/openai"),
          node=True),
    Stack("mcp client and server, initialize handshake (stateful)", ("mcp_agent.py", "{mcp}", "legacy"), ("mcp",),
          model_calls=0, mcp="stateful"),
    Stack("mcp client and server, 2026-07 protocol (stateless)", ("mcp_agent.py", "{mcp}", "auto"), ("mcp",),
          model_calls=0, mcp="stateless"),
]


def spawn_and_wait(argv: list[str], port_file: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not (port_file.exists() and port_file.read_text()):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError(f"{argv[1]} did not start")
        time.sleep(0.05)
    return proc


@pytest.fixture(scope="module")
def fake_llm(_https_api: PaidApi, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The fake model over HTTPS, with the certificate of the CA the sidecars trust."""
    port_file = tmp_path_factory.mktemp("fake-llm") / "port"
    proc = spawn_and_wait([sys.executable, str(SCRIPTS / "fake_llm.py"), "--port-file", str(port_file),
                           "--tls-dir", str(_https_api.ca.parent)], port_file)
    yield f"https://127.0.0.1:{port_file.read_text()}"
    proc.kill()
    proc.wait()


class McpServer:
    """The mcp SDK's server on a fixed port, restartable (a redeploy); its ledger in a file."""

    def __init__(self, workdir: Path, mode: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.ledger = workdir / "ledger.txt"
        self.ledger.touch()
        self.argv = [sys.executable, str(AGENTS / "mcp_server.py"), str(self.port), str(self.ledger)]
        self.argv += ["--stateless"] if mode == "stateless" else []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    @property
    def charges(self) -> int:
        return len(self.ledger.read_text().splitlines())


def durable_run(run: str, stack: Stack, env: dict[str, str], dsn: str, confdir: Path, ca: Path,
                mcp_url: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DURABLE, "run", "--run", run, "--dsn", dsn, "--confdir", str(confdir), "--upstream-ca", str(ca), "--",
         *stack.command(mcp_url)],
        env=env, capture_output=True, text=True, timeout=180,
    )


def node_packages() -> None:
    """The Node agents' packages, as package-lock.json pins them (npm ci: once, then kept); skips the
    Node rows where Node or npm is missing or the registry cannot be reached."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node rows need node and npm")
    lock = NODE / "package-lock.json"
    stamp = NODE / "node_modules" / ".installed"
    if stamp.exists() and stamp.read_text() == lock.read_text():
        return
    out = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE, capture_output=True, text=True,
                         timeout=300)
    if out.returncode != 0:
        pytest.skip(f"npm ci failed (no registry?): {out.stderr.strip()[-300:]}")
    stamp.write_text(lock.read_text())


def final_line(out: str) -> str | None:
    return next((line[len("final: "):] for line in out.splitlines() if line.startswith("final: ")), None)


@pytest.mark.parametrize("stack", STACKS, ids=[s.name for s in STACKS])
def test_a_crash_after_a_paid_tool_call_resumes_at_no_extra_cost(
    stack: Stack, fake_llm: str, https_api: PaidApi, pg_dsn: str, confdir: Path, tmp_path: Path
) -> None:
    if stack.node:
        node_packages()
    mcp = McpServer(tmp_path, stack.mcp) if stack.mcp else None
    reset(fake_llm, https_api, mcp)
    mcp_url = f"http://127.0.0.1:{mcp.port}/mcp" if mcp else ""
    env = env_without_proxy(FAKE_LLM=fake_llm, PAID_API=https_api.url)
    try:
        if mcp:
            mcp.start()
        # an uninterrupted run: what the agent should print, at what cost
        clean = durable_run(new_run(), stack, env, pg_dsn, confdir, https_api.ca, mcp_url)
        assert clean.returncode == 0, clean.stdout + clean.stderr
        expected, cost = final_line(clean.stdout), books(fake_llm, https_api, mcp)
        assert expected is not None and cost == (stack.model_calls, 0 if mcp else 1, 2 if mcp else 0)

        reset(fake_llm, https_api, mcp)  # the same books again, for a run that crashes
        run = new_run()
        crashed = durable_run(run, stack, env | {"CRASH": "1"}, pg_dsn, confdir, https_api.ca, mcp_url)
        assert crashed.returncode != 0 and final_line(crashed.stdout) is None, crashed.stdout + crashed.stderr
        if mcp:  # redeployed while the agent was down: its sessions are gone
            mcp.stop()
            mcp.start()
        resumed = durable_run(run, stack, env, pg_dsn, confdir, https_api.ca, mcp_url)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    finally:
        if mcp:
            mcp.stop()
    assert books(fake_llm, https_api, mcp) == cost, "the crash and resume cost more than one uninterrupted run"
    assert final_line(resumed.stdout) == expected
    replayed = re.search(r"(\d+) replayed", resumed.stderr)  # durable run's summary counts what it answered
    assert replayed is not None and int(replayed.group(1)) > 0 and "no call came through" not in resumed.stderr
    diverged = sql(pg_dsn, "SELECT count(*) FROM durable_steps WHERE run_id = %s AND (divergence IS NOT NULL"
                           " OR last_outcome = 'diverged')", run)
    assert diverged == [(0,)]


def reset(fake_llm: str, api: PaidApi, mcp: McpServer | None) -> None:
    requests.post(f"{fake_llm}/_reset", verify=str(api.ca), timeout=10)
    api.reset()
    if mcp:
        mcp.ledger.write_text("")


def books(fake_llm: str, api: PaidApi, mcp: McpServer | None) -> tuple[int, int, int]:
    """(model calls, payments, MCP tool charges) since the test began."""
    model = requests.get(f"{fake_llm}/_books", verify=str(api.ca), timeout=10).json()["calls"]
    return model, api.books()["charges"], mcp.charges if mcp else 0


if __name__ == "__main__":  # the stacks, their packages at the versions installed: scripts/compat_table.py
    from importlib.metadata import version

    def installed(stack: Stack, package: str) -> str:
        if stack.node:  # what package-lock.json pins
            return json.loads((NODE / "package-lock.json").read_text())["packages"][f"node_modules/{package}"]["version"]
        return version(package)

    print(json.dumps([{"name": s.name, "packages": {p: installed(s, p) for p in s.packages}} for s in STACKS]))


def test_the_readme_lists_every_stack_of_the_suite() -> None:
    """The README's "Works with" table is generated from this suite: a stack added here and not
    there (scripts/compat_table.py not run) fails here."""
    check = subprocess.run([sys.executable, str(SCRIPTS / "compat_table.py"), "--check"], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
