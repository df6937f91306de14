"""Starts of the agent (proxy/peers.py) through a real sidecar: an attempt id reused by a second
start of the agent replays only once no process of the first start is alive. A worker that outlives
its group's leader, or one a live agent starts in a session of its own, is the live attempt: its
calls go upstream, never answered with an earlier call's answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PaidApi, Sidecars, new_run
from durable_sidecar.proxy import peers

# argv: proxy, url, shape. Each call on a connection of its own (the sidecar traces each connection's owner).
AGENT = r'''
import json, os, subprocess, sys, time, urllib.request
proxy, url, shape = sys.argv[1:4]
def poll():
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))
    with opener.open(urllib.request.Request(url, headers={"Connection": "close"}), timeout=30) as r:
        return json.loads(r.read())["call"]
if shape == "worker":
    time.sleep(float(sys.argv[4]))  # "outlives": its leader has exited by now
    print(poll(), flush=True)
    sys.exit(0)
print(poll(), flush=True)
worker = [sys.executable, __file__, proxy, url, "worker"]
if shape == "outlives":  # same process group; the leader exits at once and is reaped (the pipes are not shared)
    subprocess.Popen(worker + ["1.0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
else:  # "setsid": a session (and group) of its own, while this agent waits for it
    subprocess.run(worker + ["0"], start_new_session=True)
'''


@pytest.mark.parametrize("shape", ["outlives", "setsid"])
def test_a_worker_of_a_live_attempt_is_that_attempt_not_a_second_start(
    shape: str, sidecars: Sidecars, http_api: PaidApi, tmp_path: Path
) -> None:
    sidecar = sidecars.start()
    script = tmp_path / "agent.py"
    script.write_text(AGENT)
    url = f"{http_api.url}/v1/search?q=poll"
    leader = subprocess.run([sys.executable, str(script), sidecar.proxy_url(new_run(), "exported-once"), url, shape],
                            capture_output=True, text=True, timeout=60, start_new_session=True)
    assert leader.returncode == 0, leader.stderr
    calls = [int(line) for line in leader.stdout.split()]
    deadline = time.monotonic() + 20
    while shape == "outlives" and len(calls) < 2 and time.monotonic() < deadline:  # the worker's call comes later
        time.sleep(0.1)
        calls = [c["n"] for c in http_api.books()["booked"]]
    assert len(calls) == 2 and calls[0] != calls[1], calls  # two polls, two answers: nothing stale
    assert [c["kind"] for c in http_api.books()["booked"]] == ["search", "search"]
    assert "second start" not in sidecar.log()


def test_a_start_is_new_only_when_no_process_of_the_first_is_alive() -> None:
    alive = {"100.5": True}
    starts = peers.Starts(alive=lambda start: alive[start])
    assert starts.attempt("r", "a", "100.5") == "a"
    assert starts.attempt("r", "a", "100") == "a"  # the leader exited, a member lives on
    alive["100.5"] = False
    assert starts.attempt("r", "a", "200.9").startswith("a@")  # a re-run after the first died
    assert starts.attempt("r", "a", "100") == "a"  # decided once per start
    assert peers.group_alive(str(os.getpgrp())) and not peers.group_alive("999999999")


@pytest.mark.parametrize(("family", "listen", "connect"), [
    ("v4", "127.0.0.1", "127.0.0.1"), ("v6", "::1", "::1"), ("dual-stack", "::", "127.0.0.1")])
def test_the_kernel_names_an_agents_socket_as_proc_net_does(family: str, listen: str, connect: str) -> None:
    """sock_diag's exact lookup finds the socket /proc/net/tcp* lists (and the IPv4 agent of a
    dual-stack listener, which the /proc tables file under the other family), and its owner: us."""
    import socket

    kind = socket.AF_INET if family == "v4" else socket.AF_INET6
    listener = socket.create_server((listen, 0), family=kind, dualstack_ipv6=family == "dual-stack")
    client = socket.create_connection((connect, listener.getsockname()[1]))
    server, _ = listener.accept()
    peer, local = server.getpeername(), server.getsockname()
    inode = peers.diag_inode(peer, local)
    assert inode is not None
    if family != "dual-stack":
        assert inode == peers.socket_inode(peer, local)
    assert peers.start_of_connection(peer, local).split(".")[0] == str(os.getpgrp())
    for sock in (client, server, listener):
        sock.close()
