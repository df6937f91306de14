"""The launcher's parts one at a time, in process: the proxy URL and environment it hands an agent,
the CA bundles, the sidecar's logs, its health probe and its start-up checks (against small stand-in
processes and servers). test_launcher.py drives the same code whole, through `durable run`; these
take a second or two, so scripts/mutate.sh runs them first."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from canned import Canned, canned_server
from conftest import gone, wait_for

from durable_sidecar.tools import launcher

CA = b"-----BEGIN CERTIFICATE-----\nMIIBsidecar\n-----END CERTIFICATE-----\n"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DURABLE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_the_proxy_url_carries_run_attempt_and_token_however_they_are_spelt() -> None:
    url = launcher.proxy_url("127.0.0.1:8080", "run/1:a@b", "att:2", "tok")
    parts = urlsplit(url)
    assert (parts.scheme, parts.hostname, parts.port) == ("http", "127.0.0.1", 8080)
    assert (unquote(parts.username), unquote(parts.password)) == ("run/1:a@b", "att:2~tok")
    assert launcher.proxy_url("h:1", "r", "a") == "http://r:a@h:1"
    sidecar = launcher.Sidecar(None, 4242, Path("/c"), Path("/l"))  # type: ignore[arg-type]
    assert sidecar.proxy_url("r", "a", "t") == "http://r:a~t@127.0.0.1:4242"
    assert sidecar.ca_cert == Path("/c/mitmproxy-ca-cert.pem")
    assert sidecar.log() == ""  # no log written yet


def test_a_sidecar_log_that_is_not_utf8_is_read_all_the_same(tmp_path: Path) -> None:
    log = tmp_path / "sidecar.log"
    log.write_bytes(b"journal at caf\xe9\n")  # a latin-1 path in a log line
    assert launcher.Sidecar(None, 1, tmp_path, log).log() == "journal at caf\ufffd\n"  # type: ignore[arg-type]


def test_the_agents_environment_routes_every_client_through_the_sidecar(tmp_path: Path) -> None:
    base = {"PATH": "/bin", "NO_PROXY": "*", "no_proxy": "*", "ALL_PROXY": "x", "all_proxy": "x", "SSL_CERT_DIR": "/d"}
    env = launcher.agent_env("http://r:a@127.0.0.1:1", tmp_path / "b.pem", base)
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        assert env[name] == "http://r:a@127.0.0.1:1"
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"):
        assert env[name] == str(tmp_path / "b.pem")
    assert env["NODE_USE_ENV_PROXY"] == "1" and env["PATH"] == "/bin"
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "SSL_CERT_DIR"):
        assert name not in env  # nothing that would let a call go around the sidecar or its CA
    assert launcher.agent_env("u", tmp_path, None)["HOME"] == os.environ["HOME"]  # the caller's own by default


def test_a_bundle_holds_the_system_cas_and_the_sidecars_and_is_written_once_per_ca(home: Path) -> None:
    system = launcher.system_ca_file()
    assert system is not None and system.is_file()
    text = launcher.bundle_text(CA)
    assert text == system.read_text() + "\n" + CA.decode()
    path = launcher.bundle_for(CA)
    assert path == home / "bundles" / f"ca-bundle-{hashlib.sha256(CA.strip()).hexdigest()[:16]}.pem"
    assert path.read_text() == text
    written = path.stat().st_mtime_ns
    time.sleep(0.01)
    assert launcher.bundle_for(CA) == path and path.stat().st_mtime_ns == written  # unchanged: not rewritten
    assert launcher.bundle_for(CA + b"\n") == path  # the same CA: the same file
    other = launcher.bundle_for(CA.replace(b"sidecar", b"another"))
    assert other != path and "another" in other.read_text()
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, other.name])  # no temporary left
    path.write_text("stale")
    assert launcher.bundle_for(CA).read_text() == text  # a bundle that differs is written again
    out = launcher.write_ca_bundle(path, home / "new" / "deep" / "bundle.pem")
    assert out.read_text() == launcher.bundle_text(text.encode())
    assert launcher.write_ca_bundle(path, out) == out  # written again in place


def test_logs_live_under_durable_home_and_only_the_newest_are_kept(home: Path) -> None:
    assert launcher.confdir_default() == home / "certs" and launcher.logs_dir() == home / "logs"
    (home / "logs").mkdir(parents=True)
    for n in range(25):
        old = home / "logs" / f"sidecar-{n:03}.log"
        old.write_text("")
        os.utime(old, (n, n))
    (home / "logs" / "other.txt").write_text("")
    path = launcher.new_log_path(4242)
    assert path.parent == home / "logs" and re.fullmatch(r"sidecar-\d{8}-\d{6}-4242\.log", path.name)
    kept = sorted(p.name for p in (home / "logs").glob("sidecar-*.log"))
    newest = [f"sidecar-{n:03}.log" for n in range(6, 25)]
    assert kept == newest  # with the new one, twenty in all
    assert (home / "logs" / "other.txt").exists()


@pytest.fixture
def health_server() -> Iterator[Canned]:
    """Stands for a sidecar as its health probe meets it: a proxy asked for http://durable.sidecar/health."""
    with canned_server() as server:
        yield server


def test_the_health_probe_says_why_a_sidecar_does_not_serve(health_server: Canned) -> None:
    address = health_server.address
    health_server.answers[launcher.HEALTH_URL] = (200, b"ok")
    assert launcher.health(address) == (True, "")
    health_server.answers[launcher.HEALTH_URL] = (503, b"  durable-sidecar: journal unreachable\n")
    assert launcher.health(address) == (False, "503: durable-sidecar: journal unreachable")
    health_server.answers[launcher.HEALTH_URL] = (503, b"\xff not UTF-8")
    assert launcher.health(address) == (False, "503: \ufffd not UTF-8")
    health_server.answers[launcher.HEALTH_URL] = (502, b"x" * 500)
    assert launcher.health(address) == (False, "502: " + "x" * 300)
    ready, why = launcher.health(f"127.0.0.1:{launcher.free_port()}")
    assert not ready and "refused" in why


def default_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def stand_in(tmp_path: Path, script: str, name: str = "stand-in") -> launcher.Sidecar:
    """A process in the sidecar's place, with a log of its own."""
    log = tmp_path / f"{name}.log"
    with open(log, "ab") as out:
        # signals as a terminal's shell has them: a job started in the background inherits SIGINT
        # ignored, and a shell may not trap a signal ignored on entry
        process = subprocess.Popen(["sh", "-c", script], stdout=out, stderr=subprocess.STDOUT, preexec_fn=default_signals)
    return launcher.Sidecar(process, launcher.free_port(), tmp_path, log)


def test_a_sidecar_that_exits_names_the_line_that_says_why(tmp_path: Path) -> None:
    failing = stand_in(tmp_path, "echo starting; echo 'configuration error: bad durable_dsn'; echo bye; exit 3")
    with pytest.raises(launcher.SidecarFailed) as failed:
        failing.wait_serving(timeout=10)
    assert failed.value.reason == "sidecar exited with 3: configuration error: bad durable_dsn"
    assert str(failed.value).startswith(f"{failed.value.reason} (log: {failing.log_path}):\nstarting\n")
    long = stand_in(tmp_path, "i=0; while [ $i -lt 400 ]; do echo line-$i-of-the-log; i=$((i+1)); done; exit 6", "long")
    with pytest.raises(launcher.SidecarFailed) as tail:
        long.wait_serving(timeout=10)
    assert str(tail.value) == f"{tail.value.reason} (log: {long.log_path}):\n{long.log()[-3000:]}"  # its tail
    assert failed.value.log_path == failing.log_path and "bye" in str(failed.value)
    quiet = stand_in(tmp_path, "exit 4", "quiet")
    with pytest.raises(launcher.SidecarFailed, match=r"sidecar exited with 4: exit status 4"):
        quiet.wait_serving(timeout=10)
    last = stand_in(tmp_path, "echo one; echo two; echo '  last words  '; exit 5", "last")
    with pytest.raises(launcher.SidecarFailed) as failed:
        last.wait_serving(timeout=10)
    assert failed.value.reason == "sidecar exited with 5: last words"


def test_a_sidecar_that_never_serves_is_killed_after_the_timeout(tmp_path: Path) -> None:
    silent = stand_in(tmp_path, "exec sleep 60")
    started = time.monotonic()
    silent.log_path.write_text("x" * 2000 + "y" * 3000)
    with pytest.raises(launcher.SidecarFailed) as failed:
        silent.wait_serving(timeout=0.5)
    reason = f"sidecar on 127.0.0.1:{silent.port} did not serve within 0.5s ("
    assert failed.value.reason.startswith(reason) and str(failed.value).endswith(":\n" + "y" * 3000)
    assert time.monotonic() - started < 5
    assert silent.process.returncode == -signal.SIGKILL  # killed on the way out, not left running


def test_a_sidecar_whose_journal_is_down_counts_as_started_only_when_asked(
    tmp_path: Path, health_server: Canned
) -> None:
    health_server.answers[launcher.HEALTH_URL] = (503, b"durable-sidecar: journal unreachable")
    sidecar = stand_in(tmp_path, "exec sleep 60")
    sidecar.port = health_server.port
    sidecar.wait_serving(timeout=10, journal_required=False)
    assert sidecar.process.poll() is None
    with pytest.raises(launcher.SidecarFailed, match=r"\(503: durable-sidecar: journal unreachable\)"):
        sidecar.wait_serving(timeout=0.3)
    health_server.answers[launcher.HEALTH_URL] = (502, b"bad gateway")  # not the addon speaking: mitmproxy before it loaded
    other = stand_in(tmp_path, "exec sleep 60", "other")
    other.port = health_server.port
    with pytest.raises(launcher.SidecarFailed):
        other.wait_serving(timeout=0.3, journal_required=False)


def test_stop_is_polite_first_and_kills_what_lingers(tmp_path: Path) -> None:
    polite = stand_in(tmp_path, "trap 'exit 7' INT; sleep 60 & wait")
    time.sleep(0.2)
    polite.stop()
    assert polite.process.returncode == 7  # it got SIGINT and left on its own
    stubborn = stand_in(tmp_path, "trap '' INT; exec sleep 60", "stubborn")
    time.sleep(0.2)
    stubborn.stop(timeout=0.3)
    assert stubborn.process.returncode == -signal.SIGKILL
    stubborn.stop()
    stubborn.kill()  # both harmless once it is gone


def test_mitmdump_is_the_one_beside_the_interpreter_else_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert launcher.mitmdump() == str(Path(sys.executable).with_name("mitmdump"))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    (tmp_path / "bin").mkdir()
    on_path = tmp_path / "bin" / "mitmdump"
    on_path.write_text("#!/bin/sh\n")
    on_path.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert launcher.mitmdump() == str(on_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError) as missing:
        launcher.mitmdump()
    assert str(missing.value) == "mitmdump not found: pip install durable-sidecar (it brings mitmproxy)"


def test_start_sidecar_runs_mitmdump_with_the_addon_in_a_session_of_its_own(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its own session: a Ctrl-C meant for the launcher's terminal does not reach it. Its arguments:
    the addon, where it listens, its CA's folder and every option given."""
    argv = tmp_path / "argv"
    fake = tmp_path / "mitmdump"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {argv}.tmp; mv {argv}.tmp {argv}; echo started; exec sleep 60\n')
    fake.chmod(0o755)
    monkeypatch.setattr(launcher, "mitmdump", lambda: str(fake))
    sidecar = launcher.start_sidecar(
        tmp_path / "certs", {"durable_run": "r1"}, port=4321, listen_host="0.0.0.0", wait=False
    )
    try:
        args = wait_for(argv).splitlines()
        assert args == [
            "-s",
            str(launcher.SCRIPT),
            "--listen-host",
            "0.0.0.0",
            "-p",
            "4321",
            "--set",
            f"confdir={tmp_path / 'certs'}",
            "--set",
            "durable_run=r1",
        ]
        assert (tmp_path / "certs").is_dir() and sidecar.listen_host == "0.0.0.0" and sidecar.port == 4321
        assert os.getsid(sidecar.process.pid) == sidecar.process.pid
        assert sidecar.log_path.parent == home / "logs" and "started" in sidecar.log()
    finally:
        sidecar.kill()


def test_a_sidecar_started_to_die_with_its_parent_does(tmp_path: Path) -> None:
    """die_with_parent: SIGKILL the launcher and its sidecar gets SIGTERM (PR_SET_PDEATHSIG)."""
    pidfile = tmp_path / "sidecar.pid"
    fake = tmp_path / "mitmdump"
    fake.write_text(f"#!/bin/sh\necho $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; exec sleep 60\n")
    fake.chmod(0o755)
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom durable_sidecar.tools import launcher\n"
            f"launcher.mitmdump = lambda: {str(fake)!r}\n"
            f"launcher.start_sidecar(launcher.Path({str(tmp_path)!r}), log_path=launcher.Path({str(tmp_path / 'log')!r}),"
            " die_with_parent=True, wait=False)\ntime.sleep(60)\n",
        ],
    )
    child = int(wait_for(pidfile))
    parent.kill()
    parent.wait()
    assert gone([child], timeout=10) == []


def test_the_sidecar_the_launcher_starts_is_the_addon_on_free_ports() -> None:
    from durable_sidecar.proxy import sidecar as sidecar_module

    assert launcher.SCRIPT.is_file() and launcher.SCRIPT == Path(sidecar_module.__file__).parents[1] / "durable.py"
    ports = {launcher.free_port() for _ in range(5)}
    assert len(ports) > 1 and min(ports) > 1024  # the kernel's choice, not a fixed one


def test_the_urls_the_launcher_asks_are_the_ones_the_sidecar_answers(pg_dsn: str) -> None:
    from mitmproxy import http
    from mitmproxy.test import tflow

    from durable_sidecar.proxy import endpoints
    from inprocess import sidecar

    async def ask(url: str) -> int:
        async with sidecar(pg_dsn) as addon:
            flow = tflow.tflow(req=http.Request.make("GET", url))
            await addon.request(flow)
            assert flow.response is not None
            return flow.response.status_code

    assert asyncio.run(ask(launcher.HEALTH_URL)) == 200
    assert asyncio.run(ask(launcher.FLUSH_URL)) == 204
    ca = http.Request.make("GET", launcher.CA_URL)
    assert endpoints.addressed(ca) and ca.path == "/ca.pem"


def test_a_sidecar_given_no_time_is_not_listening_yet(tmp_path: Path) -> None:
    never = stand_in(tmp_path, "exec sleep 60")
    with pytest.raises(launcher.SidecarFailed) as failed:
        never.wait_serving(timeout=0)
    assert failed.value.reason == f"sidecar on 127.0.0.1:{never.port} did not serve within 0s (not listening yet)"


def test_start_sidecar_waits_for_a_journal_by_default(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, health_server: Canned
) -> None:
    """By default start_sidecar returns only once the sidecar serves with its journal: one that
    answers that its journal is down (here a stand-in health answer) is not started."""
    fake = tmp_path / "mitmdump"
    fake.write_text("#!/bin/sh\nexec sleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setattr(launcher, "mitmdump", lambda: str(fake))
    health_server.answers[launcher.HEALTH_URL] = (503, b"durable-sidecar: journal unreachable")
    with pytest.raises(launcher.SidecarFailed, match="journal unreachable"):
        launcher.start_sidecar(tmp_path / "a" / "certs", port=health_server.port, timeout=0.5)
    assert (tmp_path / "a" / "certs").is_dir()


def test_a_system_ca_file_is_one_that_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    missing = ssl.DefaultVerifyPaths(str(tmp_path / "gone.pem"), None, "", str(bundle), "", "")  # type: ignore[call-arg]
    monkeypatch.setattr(ssl, "get_default_verify_paths", lambda: missing)
    assert launcher.system_ca_file() == bundle
