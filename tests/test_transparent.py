"""Clients that ignore proxy variables: mitmproxy's transparent mode with the run from `durable_run`.

The agent (curl, with no proxy settings at all) lives in a network namespace of the test's own; its
traffic to the upstream crosses a veth pair and an iptables REDIRECT sends it to the sidecar. Needs
root, `ip` and `iptables`: skipped, saying why, where the machine does not allow it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from durable_sidecar.tools import launcher
from conftest import new_run, paid_api


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


def netns_allowed() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces and iptables"
    for tool in ("ip", "iptables"):
        if not shutil.which(tool):
            return f"needs `{tool}` (Debian: apt-get install iproute2 iptables)"
    probe = f"dprobe{uuid.uuid4().hex[:6]}"
    try:
        sh("ip", "netns", "add", probe)
        sh("ip", "netns", "del", probe)
        sh("iptables", "-t", "nat", "-L", "PREROUTING", "-n")
    except (subprocess.CalledProcessError, OSError) as e:
        return f"network namespaces or iptables not permitted here: {e}"
    return None


@pytest.fixture
def namespace() -> Iterator[tuple[str, str, str]]:
    """(namespace, host-side address, agent-side address); torn down whatever happens."""
    reason = netns_allowed()
    if reason:
        pytest.skip(reason)
    tag = uuid.uuid4().hex[:5]
    ns, host_if, agent_if = f"dns{tag}", f"dh{tag}", f"da{tag}"
    subnet = 10 + int(tag, 16) % 200
    host_ip, agent_ip = f"10.{subnet}.77.1", f"10.{subnet}.77.2"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", agent_if)
        sh("ip", "link", "set", agent_if, "netns", ns)
        sh("ip", "addr", "add", f"{host_ip}/24", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{agent_ip}/24", "dev", agent_if)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", agent_if, "up")
        yield ns, host_ip, host_if
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_transparent_mode_records_and_replays_a_proxy_unaware_client(
    namespace: tuple[str, str, str], confdir: Path, pg_dsn: str, tmp_path: Path
) -> None:
    ns, host_ip, host_if = namespace
    api, api_port = paid_api.spawn(tmp_path, host=host_ip)
    sidecar_port = launcher.free_port()
    rule = ["PREROUTING", "-i", host_if, "-p", "tcp", "-j", "REDIRECT", "--to-port", str(sidecar_port)]
    started: list[launcher.Sidecar] = []
    try:
        url = f"http://{host_ip}:{api_port}/v1/search?q=transparent"
        sh("iptables", "-t", "nat", "-A", *rule)
        run = new_run()
        outcomes = []
        for attempt in ("t1", "t2"):  # the sidecar restarted with a new attempt: the agent restarted
            sidecar = launcher.start_sidecar(
                confdir,
                {"mode": "transparent", "durable_dsn": pg_dsn, "durable_run": run, "durable_attempt": attempt,
                 "durable_allow_remote_clients": "true"},  # the agent is in another namespace: not loopback
                port=sidecar_port, listen_host=host_ip,
            )
            started.append(sidecar)
            out = subprocess.run(["ip", "netns", "exec", ns, "curl", "-s", "-m", "10", "-D", "-", url],
                                 capture_output=True, text=True, timeout=30, env={"PATH": os.environ["PATH"]})
            outcomes.append(next(line.split(": ", 1)[1].strip() for line in out.stdout.splitlines()
                                 if line.lower().startswith("durable-outcome:")))
            assert '"query": "transparent"' in out.stdout and '"call": 1' in out.stdout
            sidecar.stop()
        assert outcomes == ["recorded", "replayed"]
    finally:
        subprocess.run(["iptables", "-t", "nat", "-D", *rule], capture_output=True)
        for sidecar in started:
            sidecar.kill()
        api.kill()
