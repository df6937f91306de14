"""`durable run` as a user meets it: signals, pre-flight checks, the CA it hands the agent, its logs.

Every test drives the real `durable` command, a real sidecar and a real agent process, and checks
by pid that nothing it started is left behind.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from durable_sidecar.tools import launcher
from conftest import PaidApi, Sidecars, env_without_proxy, gone, new_run, on_a_terminal, terminal_output, wait_for

DURABLE = str(Path(sys.executable).with_name("durable"))
SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]


def start_run(
    tmp_path: Path, dsn: str | None, env: dict[str, str], agent: str = "exec sleep 60"
) -> tuple[subprocess.Popen[str], int, list[int]]:
    """`durable run -- sh` whose agent writes its pid and sleeps (or runs `agent`): the launcher, the
    agent's pid, and every process the launcher started."""
    pidfile = tmp_path / f"agent-{time.monotonic_ns()}.pid"
    args = [DURABLE, "run", "--run", new_run()] + (["--dsn", dsn] if dsn else [])
    proc = subprocess.Popen(args + ["--", "sh", "-c", f"{agent.replace('PIDFILE', str(pidfile))}" if "PIDFILE" in agent
                                    else f"echo $$ > {pidfile}; {agent}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    agent = int(wait_for(pidfile))
    started = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    assert agent in started and len(started) >= 2  # the agent and the sidecar at least
    return proc, agent, started


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_a_signal_to_durable_run_reaches_the_agent_and_leaves_nothing_behind(
    sig: signal.Signals, pg_dsn: str, tmp_path: Path
) -> None:
    proc, agent, started = start_run(tmp_path, pg_dsn, env_without_proxy())
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig  # the agent's status: killed by the signal passed on
    assert "0 recorded, 0 replayed" in stderr and "Traceback" not in stderr  # the summary, no traceback
    assert gone(started) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_to_durable_run_reaches_the_agents_children_too(sig: signal.Signals, pg_dsn: str, tmp_path: Path) -> None:
    """An agent that is a shell with a child of its own: the signal goes to the agent's whole process
    group, so the child does not live on (sent to the shell's pid alone, the sleep would)."""
    proc, agent, started = start_run(tmp_path, pg_dsn, env_without_proxy(), "sleep 60 & echo $$ > PIDFILE; wait")
    children = [c.pid for c in psutil.Process(agent).children()]
    assert children and all(c in started for c in children)
    proc.send_signal(sig)
    proc.communicate(timeout=30)
    assert gone(children) == [] and gone(started) == []


def test_durable_run_killed_with_sigkill_leaves_no_agent(pg_dsn: str, tmp_path: Path) -> None:
    """SIGKILL cannot be passed on: the watchdog sees durable run die and ends the agent's whole
    process group (a shell and its child here); the sidecar stops by its parent-death signal."""
    proc, agent, started = start_run(tmp_path, pg_dsn, env_without_proxy(), "sleep 60 & echo $$ > PIDFILE; wait")
    children = [c.pid for c in psutil.Process(agent).children()]
    assert children
    proc.kill()
    proc.communicate(timeout=30)
    assert gone([agent, *children]) == [] and gone(started) == []


def test_embedded_postgres_stops_with_the_last_launcher(embedded_home: Path, tmp_path: Path) -> None:
    """No --dsn, no DATABASE_URL: the embedded PostgreSQL the launcher started stops when it exits."""
    home = embedded_home
    env = env_without_proxy(DURABLE_HOME=str(home))
    env.pop("DATABASE_URL", None)
    proc, agent, started = start_run(tmp_path, None, env)
    postmaster = int((home / "pgdata" / "postmaster.pid").read_text().split()[0])
    assert psutil.pid_exists(postmaster)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert gone([*started, postmaster], timeout=30) == []


def test_ctrl_c_on_a_terminal_reaches_the_agent_once(pg_dsn: str, tmp_path: Path) -> None:
    """The agent runs in the terminal's foreground group: Ctrl-C is delivered to it by the terminal,
    once, not a second time by `durable`; the summary follows and the status is 130."""
    seen, ready = tmp_path / "signals", tmp_path / "ready"
    agent = tmp_path / "agent.py"
    agent.write_text(
        "import signal, sys, time\n"
        f"def on(s, f): open({str(seen)!r}, 'a').write('INT\\n')\n"
        "signal.signal(signal.SIGINT, on)\n"
        f"open({str(ready)!r}, 'w').write('1')\n"
        "deadline = time.monotonic() + 30\n"
        f"while time.monotonic() < deadline and not open({str(seen)!r}, 'a+').tell(): time.sleep(0.05)\n"
        "time.sleep(1)\n"  # a second SIGINT would land here
        "signal.signal(signal.SIGINT, signal.SIG_DFL); import os; os.kill(os.getpid(), signal.SIGINT)\n"
    )
    proc, fd = on_a_terminal([DURABLE, "run", "--run", new_run(), "--dsn", pg_dsn, "--", sys.executable, str(agent)],
                             env_without_proxy())
    wait_for(ready)
    os.write(fd, b"\x03")  # Ctrl-C, as typed
    output = terminal_output(proc, fd)
    assert proc.returncode == 130, output
    assert seen.read_text() == "INT\n"
    assert b"0 recorded" in output and b"Traceback" not in output


def test_an_agent_on_a_terminal_reads_what_is_typed(pg_dsn: str, tmp_path: Path) -> None:
    """The agent gets the terminal's foreground: it reads what is typed (in a background group, its
    read would stop it with SIGTTIN, and the run would hang)."""
    ready = tmp_path / "ready"
    code = f"open({str(ready)!r}, 'w').write('1'); print('got', input())"
    proc, fd = on_a_terminal([DURABLE, "run", "--run", new_run(), "--dsn", pg_dsn, "--", sys.executable, "-c", code],
                             env_without_proxy())
    try:
        wait_for(ready)
        os.write(fd, b"hello\n")
        output = terminal_output(proc, fd, timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert b"got hello" in output and proc.returncode == 0, output


def test_the_terminal_goes_to_the_agent_and_back_even_with_output_to_a_file(pg_dsn: str, tmp_path: Path) -> None:
    """stdin is what makes a terminal the agent's (its stdout may go to a file): the agent reads what
    is typed, and once it is done the terminal is the shell's again, which reads the next line."""
    ready, back, out = tmp_path / "ready", tmp_path / "back", tmp_path / "out"
    code = f"open({str(ready)!r}, 'w').write('1'); print('agent got', input())"
    durable = shlex.join([DURABLE, "run", "--run", new_run(), "--dsn", pg_dsn, "--", sys.executable, "-c", code])
    script = f"{durable} > {out}; echo 1 > {back}; read line; echo shell got $line"
    proc, fd = on_a_terminal(["sh", "-c", script], env_without_proxy())
    try:
        wait_for(ready)
        os.write(fd, b"hello\n")
        wait_for(back)
        os.write(fd, b"again\n")
        output = terminal_output(proc, fd, timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert out.read_text() == "agent got hello\n"
    assert b"shell got again" in output and proc.returncode == 0, output


def test_the_run_names_its_sidecar_and_a_killed_run_takes_its_sidecar_along(pg_dsn: str, tmp_path: Path) -> None:
    """The banner names the run, attempt, proxy and the sidecar's log. SIGKILL `durable run` (no
    chance to stop anything) and its sidecar still goes: the kernel sends it SIGTERM."""
    run = new_run()
    log = tmp_path / "stderr"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([DURABLE, "run", "--run", run, "--attempt", "a7", "--dsn", pg_dsn, "--", "sh", "-c",
                                 f"echo $$ > {tmp_path / 'pid'}; exec sleep 60"], stderr=stderr, env=env_without_proxy())
    agent = int(wait_for(tmp_path / "pid"))
    sidecar = [c.pid for c in psutil.Process(proc.pid).children()
               if c.pid != agent and "watchdog" not in " ".join(c.cmdline())]
    banner = log.read_text()
    assert re.match(rf"durable: run {run}, attempt a7, proxy 127\.0\.0\.1:\d+, sidecar log \S+/sidecar-\S+\.log$",
                    banner.strip()), banner
    proc.kill()
    proc.wait()
    assert len(sidecar) == 1 and gone(sidecar) == [] and gone([agent]) == []  # the agent too: the watchdog


def durable_run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DURABLE, "run", "--run", new_run(), *args], capture_output=True, text=True,
                          env=env or env_without_proxy(), timeout=timeout)


def test_an_unreachable_journal_stops_the_run_before_the_agent(tmp_path: Path) -> None:
    marker = tmp_path / "agent-ran"
    dsn = f"postgresql://postgres@127.0.0.1:{launcher.free_port()}/nothing"
    out = durable_run("--dsn", dsn, "--", "touch", str(marker))
    assert out.returncode == 1 and not marker.exists()
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("durable run: the journal does not answer") and "fix --dsn" in line
    assert "the agent was not started" in line


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_while_the_sidecar_starts_ends_the_run_as_that_signal_would(
    sig: signal.Signals, pg_dsn: str, tmp_path: Path
) -> None:
    """A signal before the agent starts (the sidecar still booting): no agent, the sidecar stopped,
    and `durable run` exits 128 + N, as a shell reports a command that signal ended."""
    marker = tmp_path / "agent-ran"
    proc = subprocess.Popen([DURABLE, "run", "--run", new_run(), "--dsn", pg_dsn, "--", "touch", str(marker)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_without_proxy())
    deadline = time.monotonic() + 30
    while not (started := [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]):
        assert time.monotonic() < deadline and proc.poll() is None, "no sidecar was started"
        time.sleep(0.02)
    proc.send_signal(sig)  # the sidecar is a child: durable run's handlers are in place, the agent not started
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr and not marker.exists()
    assert gone(started) == []


def test_an_unreachable_proxy_stops_the_run_before_the_agent(pg_dsn: str, tmp_path: Path) -> None:
    marker = tmp_path / "agent-ran"
    out = durable_run("--dsn", pg_dsn, "--proxy", f"http://127.0.0.1:{launcher.free_port()}", "--", "touch", str(marker))
    assert out.returncode == 1 and not marker.exists()
    (line,) = out.stderr.strip().splitlines()
    assert "no serving sidecar at 127.0.0.1:" in line and "durable proxy --port" in line


def test_proxy_hands_the_agent_the_ca_of_that_sidecar(
    sidecars: Sidecars, https_api: PaidApi, pg_dsn: str, tmp_path: Path
) -> None:
    """A sidecar started with a CA folder of its own: `--proxy` alone gets the agent through TLS; a
    --confdir holding another CA is refused before the agent starts, saying why."""
    sidecar = sidecars.start(ssl_insecure="true")
    proxy = f"http://127.0.0.1:{sidecar.port}"
    run = new_run()
    curl = ["curl", "-s", "-D", "-", f"{https_api.url}/v1/search?q=ca"]
    out = subprocess.run([DURABLE, "run", "--run", run, "--dsn", pg_dsn, "--proxy", proxy, "--", *curl],
                         capture_output=True, text=True, env=env_without_proxy(), timeout=60)
    assert out.returncode == 0 and "durable-outcome: recorded" in out.stdout.lower(), out.stderr
    other = tmp_path / "other-certs"
    subprocess.run([DURABLE, "ca", "path", "--confdir", str(other)], check=True, capture_output=True)
    refused = durable_run("--dsn", pg_dsn, "--proxy", proxy, "--confdir", str(other), "--", *curl)
    assert refused.returncode == 1 and "is not the CA the sidecar at" in refused.stderr
    assert https_api.books()["calls"] == 1


def test_the_summary_behind_a_running_sidecar_counts_the_replays(
    sidecars: Sidecars, http_api: PaidApi, pg_dsn: str
) -> None:
    """`durable run --proxy`: an attempt whose three calls were all replayed says so (the sidecar
    writes replay counts every half second; the launcher asks it to write them before it reads)."""
    sidecar = sidecars.start()
    proxy, run = f"http://127.0.0.1:{sidecar.port}", new_run()
    curl = ["sh", "-c", " ; ".join(f"curl -s -o /dev/null {http_api.url}/v1/search?q={n}" for n in range(3))]
    first = subprocess.run([DURABLE, "run", "--run", run, "--dsn", pg_dsn, "--proxy", proxy, "--", *curl],
                           capture_output=True, text=True, env=env_without_proxy(), timeout=60)
    again = subprocess.run([DURABLE, "run", "--run", run, "--dsn", pg_dsn, "--proxy", proxy, "--", *curl],
                           capture_output=True, text=True, env=env_without_proxy(), timeout=60)
    assert re.search(rf"^durable: run {run}, attempt \S+, proxy 127\.0\.0\.1:{sidecar.port}$", first.stderr, re.M)
    assert "3 recorded, 0 replayed" in first.stderr, first.stderr
    assert "0 recorded, 3 replayed" in again.stderr, again.stderr
    assert http_api.books()["calls"] == 3


def test_an_upstream_with_a_private_ca_needs_upstream_ca(https_api: PaidApi, pg_dsn: str) -> None:
    """The local HTTPS upstream signs with a CA of its own: refused (502) until `--upstream-ca` names it."""
    curl = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{https_api.url}/v1/search?q=private-ca"]
    refused = durable_run("--dsn", pg_dsn, "--", *curl)
    trusted = durable_run("--dsn", pg_dsn, "--upstream-ca", str(https_api.ca), "--", *curl)
    assert refused.stdout == "502" and trusted.stdout == "200", (refused.stdout, trusted.stdout, trusted.stderr)
    missing = durable_run("--dsn", pg_dsn, "--upstream-ca", "/nonexistent/ca.pem", "--", "true")
    assert missing.returncode != 0 and "no such file" in missing.stderr


def test_a_failed_sidecar_names_its_log_and_logs_are_pruned(pg_dsn: str) -> None:
    out = durable_run("--dsn", pg_dsn, "--set", "durable_in_doubt=sometimes", "--", "true")
    assert out.returncode == 1 and out.stderr.startswith("durable run: the sidecar did not start: "), out.stderr
    log = Path(out.stderr.split("its log: ")[1].split(")")[0])
    assert log.parent == Path(os.environ["DURABLE_HOME"]) / "logs" and "durable_in_doubt" in log.read_text()
    for n in range(launcher.KEPT_LOGS + 5):
        (log.parent / f"sidecar-20000101-0000{n:02d}-1.log").write_text("old")
    launcher.new_log_path(1)
    assert len(list(log.parent.glob("sidecar-*.log"))) == launcher.KEPT_LOGS - 1  # room for the new one


def test_the_agent_is_told_to_use_the_proxy_even_from_node_fetch() -> None:
    env = launcher.agent_env("http://r:a@127.0.0.1:1", Path("/b.pem"), base={"NO_PROXY": "*"})
    assert env["NODE_USE_ENV_PROXY"] == "1" and env["HTTPS_PROXY"] == env["HTTP_PROXY"] == "http://r:a@127.0.0.1:1"
    assert "NO_PROXY" not in env and env["NODE_EXTRA_CA_CERTS"] == "/b.pem"


def test_an_upstream_certificate_failure_is_named_in_the_summary_with_the_flag_that_fixes_it(
    https_api: PaidApi, pg_dsn: str
) -> None:
    """An upstream with a private CA and no --upstream-ca: the agent gets mitmproxy's 502, and the
    summary counts it as a TLS failure (not as a recorded call) and names --upstream-ca."""
    out = durable_run("--dsn", pg_dsn, "--", "curl", "-s", "-o", "/dev/null", f"{https_api.url}/v1/search?q=tls")
    summary = next(line for line in out.stderr.splitlines() if "recorded," in line)
    assert "0 recorded" in summary and "1 upstream TLS failure" in summary, out.stderr
    assert "--upstream-ca" in out.stderr
    assert https_api.books()["calls"] == 0
