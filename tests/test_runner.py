"""`durable run`'s checks and signals (tools/runner.py), in process: what it says when the journal or
the sidecar does not answer, the shell's exit status, and which signals it takes over while the
agent starts and runs. tests/test_launcher.py runs the whole command against real agents."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from durable_sidecar.store import database
from durable_sidecar.steps import settings
from durable_sidecar.tools import launcher, runner
from canned import Canned, canned_server
from conftest import gone, wait_for


def test_the_proxys_address_is_its_host_and_port_whatever_it_is_written_as() -> None:
    for written in ("http://run:a1~tok@127.0.0.1:8080/", "http://127.0.0.1:8080", "127.0.0.1:8080", "127.0.0.1:8080/"):
        assert runner.host_port(written) == "127.0.0.1:8080", written


def test_an_agent_ended_by_a_signal_exits_as_a_shell_reports_it() -> None:
    assert [runner.exit_status(code) for code in (0, 3, -signal.SIGTERM, -signal.SIGKILL)] == [0, 3, 143, 137]


def test_the_drain_timeout_is_the_option_given_else_the_default() -> None:
    assert runner.drain_timeout({"durable_drain_timeout": "2.5s"}) == 2.5
    assert runner.drain_timeout({}) == settings.DEFAULTS.drain_timeout_s


def test_a_journal_that_does_not_answer_is_named_without_its_password() -> None:
    dsn = f"postgresql://agent:hunter2@127.0.0.1:{launcher.free_port()}/jobs"
    with pytest.raises(runner.Failure) as failed:
        runner.check_journal(dsn)
    message = str(failed.value)
    assert message.startswith(f"the journal does not answer ({database.describe(dsn)}, from durable_dsn): ")
    assert message.endswith("; start PostgreSQL or fix --dsn / $DATABASE_URL") and "hunter2" not in message
    assert "\n" not in message and "refused" in message  # the first line of libpq's error, which says why


def test_an_embedded_postgres_that_will_not_start_says_where_its_log_is(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DURABLE_HOME", str(tmp_path))

    def refuse(dsn: str | None) -> database.Target:
        raise RuntimeError("initdb failed")

    monkeypatch.setattr(database, "resolve", refuse)
    with pytest.raises(runner.Failure) as failed:
        runner.check_journal(None)
    assert str(failed.value) == (
        f"the embedded PostgreSQL did not start (RuntimeError: initdb failed); see {tmp_path / 'pgdata' / 'log'},"
        " or give --dsn"
    )


def test_a_journal_that_answers_is_returned_with_where_it_came_from(pg_dsn: str) -> None:
    assert runner.check_journal(pg_dsn) == database.Target(pg_dsn, "durable_dsn")


def test_no_sidecar_at_the_proxy_address_says_how_to_start_one() -> None:
    address = f"127.0.0.1:{launcher.free_port()}"
    with pytest.raises(runner.Failure) as failed:
        runner.fetch_ca(address, f"http://{address}")
    message = str(failed.value)
    assert message.startswith(f"no serving sidecar at {address} (") and "refused" in message
    assert message.endswith("; start one with `durable proxy --port PORT`")


def test_a_confdir_given_with_a_proxy_must_hold_that_proxys_ca(tmp_path: Path) -> None:
    pem = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    runner.check_ca(pem, None, "127.0.0.1:1")  # no confdir: the CA comes from the sidecar itself
    with pytest.raises(runner.Failure) as failed:
        runner.check_ca(pem, tmp_path, "127.0.0.1:1")  # none there
    assert str(failed.value) == (
        f"{tmp_path / launcher.CA_CERT} is not the CA the sidecar at 127.0.0.1:1 signs with; leave out --confdir"
        " (durable run then takes the CA from the sidecar itself)"
    )
    (tmp_path / launcher.CA_CERT).write_bytes(b"-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----\n")
    with pytest.raises(runner.Failure, match=str(tmp_path / launcher.CA_CERT)):
        runner.check_ca(pem, tmp_path, "127.0.0.1:1")  # another one
    (tmp_path / launcher.CA_CERT).write_bytes(pem.strip() + b"\n\n")
    runner.check_ca(pem, tmp_path, "127.0.0.1:1")  # the same, whitespace aside


SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_a_signal_before_the_agent_starts_stops_the_start_up(sig: signal.Signals) -> None:
    before = signal.getsignal(sig)
    with pytest.raises(runner.Interrupted) as interrupted, runner.signals_forwarded([]):
        assert signal.getsignal(sig) not in (before, signal.SIG_DFL)  # taken over (else it would end pytest)
        os.kill(os.getpid(), sig)
    assert interrupted.value.signum == sig and str(interrupted.value) == sig.name
    assert signal.getsignal(sig) == before  # the handler given back on the way out


# An agent that takes SIGTERM, SIGINT and SIGHUP as a process does by default (whatever it inherited:
# a job started in the background of a script inherits SIGINT ignored), with a child of its own when
# asked, and says when it is ready: `python -c AGENT READY CHILDREN AGENT`.
AGENT = """
import os, signal, subprocess, sys, time
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, signal.SIG_DFL)
ready, children, me = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if children:
    subprocess.Popen([sys.executable, "-c", me, ready + ".child", "0", me])
    while not os.path.exists(ready + ".child"):
        time.sleep(0.01)
open(ready, "w").write("1")
time.sleep(30)
"""


def start_ready_agent(tmp_path: Path) -> subprocess.Popen[bytes]:
    """The agent above, with a child, once both are ready."""
    ready = tmp_path / "ready"
    agent = runner.start_agent([sys.executable, "-c", AGENT, str(ready), "1", AGENT], dict(os.environ))
    wait_for(ready, timeout=20)
    return agent


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_a_signal_while_the_agent_runs_reaches_its_whole_process_group(sig: signal.Signals, tmp_path: Path) -> None:
    """The agent has a child of its own: the signal goes to the agent's process group, so the child
    does not live on (sent to the agent's pid alone, it would)."""
    agent = start_ready_agent(tmp_path)
    try:
        children = psutil.Process(agent.pid).children()
        assert children and os.getpgid(children[0].pid) == agent.pid  # the agent leads a group of its own
        with runner.signals_forwarded([agent]):
            assert signal.getsignal(sig) is not signal.SIG_DFL
            os.kill(os.getpid(), sig)  # to durable run itself
            assert agent.wait(10) == -sig
        assert gone([c.pid for c in children], timeout=10) == []
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)


@pytest.fixture
def fake_sidecar() -> Iterator[Canned]:
    """An HTTP proxy answering the sidecar's own URLs as told."""
    with canned_server() as server:
        yield server


def test_a_sidecar_that_answers_hands_out_its_ca_or_says_why_not(fake_sidecar: Canned) -> None:
    address, answers = fake_sidecar.address, fake_sidecar.answers
    answers[launcher.HEALTH_URL] = (503, b"journal unavailable")
    with pytest.raises(runner.Failure) as failed:
        runner.fetch_ca(address, f"http://{address}")
    assert str(failed.value) == f"no serving sidecar at {address} (503: journal unavailable); see its log"
    answers[launcher.HEALTH_URL] = (200, b"ok")
    with pytest.raises(runner.Failure) as failed:
        runner.fetch_ca(address, f"http://{address}")
    assert str(failed.value) == (
        f"the sidecar at {address} did not hand out its CA (HTTP Error 404: Not Found); is it a durable-sidecar?"
    )
    answers[launcher.CA_URL] = (200, b"-----BEGIN CERTIFICATE-----\n")
    assert runner.fetch_ca(address, f"http://{address}") == b"-----BEGIN CERTIFICATE-----\n"


def test_a_sidecar_that_never_answers_is_a_sidecar_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "PROXY_CHECK_S", 0.3)
    with socket.socket() as silent:  # takes the connection, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(runner.Failure) as failed:
            runner.fetch_ca(address, f"http://{address}")
    assert "timed out" in str(failed.value) and str(failed.value).endswith("start one with `durable proxy --port PORT`")


def test_an_agent_command_that_does_not_exist_is_named() -> None:
    with pytest.raises(runner.Failure) as failed:
        runner.start_agent(["no-such-agent-command"], dict(os.environ))
    assert str(failed.value) == "the agent's command was not found: no-such-agent-command"
