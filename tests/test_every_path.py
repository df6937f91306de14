"""Every path a request can take through the sidecar (journaled, oversize passthrough, ignored
host, WebSocket) checks the run's token first and never lets the sidecar's own headers upstream."""

from __future__ import annotations

import asyncio
import base64
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from durable_sidecar.matching import identity
from conftest import PaidApi, Sidecars, new_run

SECRET = "s3cret-for-tests"
PATHS = {
    "journaled": ({}, "GET", "/v1/search?q=path", None),
    "oversize-passthrough": ({"durable_body_cap": 1024, "durable_oversize_request": "passthrough"}, "POST", "/v1/echo",
                             b"x" * 5000),
    "ignored-host": ({"durable_ignore_hosts": r"^127\.0\.0\.1$"}, "GET", "/v1/search?q=path", None),
}


def send(sidecar, api: PaidApi, run: str, token: str | None, path: str) -> requests.Response:
    _, method, target, body = PATHS[path]
    proxy = sidecar.proxy_url(run, "a1", token)
    return requests.request(method, f"{api.url}{target}", data=body, proxies={"http": proxy}, timeout=30,
                            headers={"Durable-Step-Key": "k1", "Durable-Note": "mine"})


@pytest.mark.parametrize("path", list(PATHS))
def test_no_token_no_upstream(path: str, sidecars: Sidecars, http_api: PaidApi) -> None:
    sidecar = sidecars.start(durable_auth_secret=SECRET, **PATHS[path][0])
    r = send(sidecar, http_api, new_run(), None, path)
    assert r.status_code == 407 and "needs its token" in r.json()["reason"]
    assert http_api.books()["calls"] == 0


@pytest.mark.parametrize("path", list(PATHS))
def test_control_headers_never_reach_the_upstream(path: str, sidecars: Sidecars, http_api: PaidApi) -> None:
    sidecar = sidecars.start(durable_auth_secret=SECRET, **PATHS[path][0])
    run = new_run()
    r = send(sidecar, http_api, run, identity.run_token(SECRET, run), path)
    assert r.status_code == 200
    seen = {name.lower() for name in http_api.books()["requests"][-1]["headers"]}
    assert not {name for name in seen if name.startswith("durable-") or name == "proxy-authorization"}


def test_websocket_needs_the_token_and_gets_no_control_headers(sidecars: Sidecars) -> None:
    import websockets.asyncio.client
    import websockets.asyncio.server

    sidecar = sidecars.start(durable_auth_secret=SECRET)
    run = new_run()
    handshakes: list[dict[str, str]] = []

    async def scenario(token: str | None) -> str:
        async def echo(ws) -> None:
            handshakes.append({k.lower(): v for k, v in ws.request.headers.raw_items()})
            async for message in ws:
                await ws.send(f"echo: {message}")

        async with websockets.asyncio.server.serve(echo, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            async with websockets.asyncio.client.connect(
                f"ws://127.0.0.1:{port}/chat", proxy=sidecar.proxy_url(run, "a1", token),
                additional_headers={"Durable-Note": "mine"},
            ) as ws:
                await ws.send("hi")
                return await ws.recv()

    with pytest.raises(Exception, match="407"):
        asyncio.run(scenario(None))
    assert handshakes == []
    assert asyncio.run(scenario(identity.run_token(SECRET, run))) == "echo: hi"
    assert not [k for k in handshakes[0] if k.startswith("durable-") or k == "proxy-authorization"]


def connect(port: int, target: str, credentials: str | None) -> tuple[bytes, socket.socket]:
    """A raw CONNECT to the sidecar: its status line, and the socket (the tunnel, if it opened)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    auth = f"Proxy-Authorization: Basic {base64.b64encode(credentials.encode()).decode()}\r\n" if credentials else ""
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return head.split(b"\r\n", 1)[0], sock


@pytest.fixture
def tcp_sink() -> Iterator[tuple[int, list[bytes]]]:
    """A TCP server that keeps whatever reaches it."""
    received: list[bytes] = []
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.settimeout(5)
            try:
                while data := conn.recv(4096):
                    received.append(data)
            except OSError:
                pass

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1], received
    server.close()


def test_every_tunnel_authenticates_and_relays_only_http(
    sidecars: Sidecars, tcp_sink: tuple[int, list[bytes]], fresh_dsn: str
) -> None:
    """With a secret set: a CONNECT without credentials is refused (407) before anything is relayed;
    with them, bytes that are not HTTP never reach the target (raw TCP is off unless asked for); and
    the journal's own database is never a destination (403), credentials or not."""
    from relay import Relay

    relay, journal_dsn = Relay.for_dsn(fresh_dsn)  # the journal at a TCP address of its own
    sidecar = sidecars.start(durable_auth_secret=SECRET, durable_dsn=journal_dsn)
    run = new_run()
    good = f"{run}:a1~{identity.run_token(SECRET, run)}"
    sink_port, received = tcp_sink
    try:
        status, sock = connect(sidecar.port, f"127.0.0.1:{sink_port}", None)
        sock.close()
        assert b" 407 " in status, status
        status, sock = connect(sidecar.port, f"127.0.0.1:{sink_port}", good)
        assert b" 200 " in status, status
        sock.sendall(b"\x00\x01 not http, not tls: raw bytes for the target\r\n\r\n")
        time.sleep(1)
        sock.close()
        for who in (None, good):
            status, sock = connect(sidecar.port, f"127.0.0.1:{relay.port}", who)
            sock.close()
            assert b" 407 " in status or b" 403 " in status, status
            if who:
                assert b" 403 " in status
        time.sleep(0.5)
        assert received == []
    finally:
        relay.close()


ALIASES = ["127.1", "2130706433", "0x7f000001", "0177.0.0.1", "0.0.0.0", "127.0.0.2", "localhost",
           "[::ffff:127.0.0.1]", "[::ffff:7f00:1]"]


@pytest.mark.parametrize("secret", [SECRET, ""], ids=["with-a-secret", "default-options"])
def test_the_journal_is_no_destination_whatever_its_address_is_spelt(
    secret: str, sidecars: Sidecars, fresh_dsn: str
) -> None:
    """Every spelling of the journal's address (short, decimal, octal, hex, unspecified, another
    loopback, a name, IPv4-mapped IPv6), by CONNECT (raw TCP on) and by plain HTTP: 403, and no
    connection reaches the database's port (the relay in front of it counts none)."""
    from relay import Relay

    relay, journal_dsn = Relay.for_dsn(fresh_dsn)
    sidecar = sidecars.start(durable_auth_secret=secret, durable_dsn=journal_dsn, durable_raw_tcp=True)
    run = new_run()
    who = f"{run}:a1~{identity.run_token(SECRET, run)}" if secret else f"{run}:a1"
    try:
        time.sleep(1)  # the sidecar's own pool and lease are connected
        before = relay.accepted
        for alias in ALIASES:
            status, sock = connect(sidecar.port, f"{alias}:{relay.port}", who)
            sock.close()
            assert b" 403 " in status, (alias, status)
            plain = socket.create_connection(("127.0.0.1", sidecar.port), timeout=10)
            auth = base64.b64encode(who.encode()).decode()
            plain.sendall(f"GET http://{alias}:{relay.port}/ HTTP/1.1\r\nHost: {alias}:{relay.port}\r\n"
                          f"Proxy-Authorization: Basic {auth}\r\n\r\n".encode())
            assert b" 403 " in plain.recv(4096).split(b"\r\n", 1)[0], alias
            plain.close()
        assert relay.accepted == before, "a connection reached the journal's port"
    finally:
        relay.close()


def test_with_a_secret_the_sidecars_own_endpoints_tell_strangers_only_that_it_is_alive(sidecars: Sidecars) -> None:
    """/flush (which writes to the journal) and /ca.pem need a run's token; /health tells a
    stranger ready or not, nothing of the lease, the journal or the calls in flight."""
    sidecar = sidecars.start(durable_auth_secret=SECRET)
    run = new_run()
    stranger = {"http": f"http://127.0.0.1:{sidecar.port}"}
    operator = {"http": sidecar.proxy_url(run, "a1", identity.run_token(SECRET, run))}
    wrong = {"http": sidecar.proxy_url(run, "a1", identity.run_token("another secret", run))}
    for who in (stranger, wrong):
        for path in ("/flush", "/ca.pem"):
            r = requests.get(f"http://durable.sidecar{path}", proxies=who, timeout=10)
            assert r.status_code == 407 and "Proxy-Authenticate" in r.headers, (path, r.status_code)
        health = requests.get("http://durable.sidecar/health", proxies=who, timeout=10)
        assert health.status_code == 200 and health.json() == {"ready": True}
    assert requests.get("http://durable.sidecar/flush", proxies=operator, timeout=10).status_code == 204
    assert b"BEGIN CERTIFICATE" in requests.get("http://durable.sidecar/ca.pem", proxies=operator, timeout=10).content
    assert set(requests.get("http://durable.sidecar/health", proxies=operator, timeout=10).json()) == {
        "ready", "journal", "lease", "in_flight"}


def test_durable_env_takes_a_secret_sidecars_ca_with_the_runs_token(sidecars: Sidecars) -> None:
    import os
    import subprocess

    from durable_sidecar.tools import launcher

    sidecar = sidecars.start(durable_auth_secret=SECRET)
    durable = str(launcher.mitmdump()).replace("mitmdump", "durable")
    command = [durable, "env", "--run", new_run(), "--proxy", f"http://127.0.0.1:{sidecar.port}"]
    env = {k: v for k, v in os.environ.items() if k != "DURABLE_AUTH_SECRET"}
    told = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env | {"DURABLE_AUTH_SECRET": SECRET})
    assert told.returncode == 0 and "export HTTPS_PROXY=" in told.stdout, told.stderr
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert refused.returncode != 0 and "set DURABLE_AUTH_SECRET" in refused.stderr


def outward_address() -> str | None:
    """This host's address on its default route: a client there is not on loopback."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") else address


@pytest.mark.parametrize("options", [{}, {"durable_auth_secret": SECRET}, {"durable_allow_remote_clients": True}],
                         ids=["protected", "secret", "allowed"])
def test_a_sidecar_on_every_interface_serves_remote_clients_only_when_told(
    options: dict, sidecars: Sidecars, http_api: PaidApi
) -> None:
    """Protected mode, as Redis's: loaded on all interfaces with no secret, the sidecar refuses a
    client that is not on loopback (403 naming both ways out), nothing forwarded or journaled, and
    serves loopback as ever; a secret or durable_allow_remote_clients lets remote clients in."""
    address = outward_address()
    if address is None:
        pytest.skip("this host has no address beyond loopback")
    from durable_sidecar.tools import launcher

    sidecar = sidecars.start(listen_host="0.0.0.0", **options)
    run = new_run()
    token = identity.run_token(SECRET, run) if options.get("durable_auth_secret") else None
    calls = http_api.books()["calls"]
    for host, served in ((address, bool(options)), ("127.0.0.1", True)):
        proxy = launcher.proxy_url(f"{host}:{sidecar.port}", run, f"a-{host}", token)
        answer = requests.get(f"{http_api.url}/v1/search?q=who", proxies={"http": proxy}, timeout=10)
        if served:
            assert answer.status_code == 200, (host, answer.text)
        else:
            assert answer.status_code == 403 and "durable_allow_remote_clients" in answer.json()["reason"]
    assert http_api.books()["calls"] == calls + 1  # one call went upstream (replayed to the second when served)
    if not options:
        assert "protected mode" in sidecar.log()


def test_calls_to_the_sidecar_itself_are_not_steps(sidecars: Sidecars, pg_dsn: str) -> None:
    """After `durable env` (which unsets NO_PROXY) an agent's curl of the sidecar's own metrics, its
    proxy port or a `durable ui` running here goes through the proxy: answered, never a step."""
    from conftest import sql
    from durable_sidecar.tools import launcher
    from test_ui import start_ui

    metrics = launcher.free_port()
    sidecar = sidecars.start(durable_metrics_listen=f"127.0.0.1:{metrics}")
    ui = start_ui(pg_dsn)
    ui_base = next(ui)
    run = new_run()
    proxies = {"http": sidecar.proxy_url(run, "a1")}
    time.sleep(1.1)  # the sidecar looks for running UIs at most once a second
    for url in (f"http://127.0.0.1:{metrics}/metrics", f"http://localhost:{metrics}/metrics",
                f"http://127.0.0.1:{sidecar.port}/", f"{ui_base}/"):
        answer = requests.get(url, proxies=proxies, timeout=10)
        assert answer.headers.get("Durable-Outcome") in ("passthrough", None), (url, answer.headers)
    ui.close()
    assert sql(pg_dsn, "SELECT count(*) FROM durable_steps WHERE run_id = %s", run) == [(0,)]
