"""`durable run`: check what the agent will need, start the sidecar, run the agent with every signal
passed on, stop everything that was started, and say what the attempt did.

Nothing here touches the agent: it gets proxy variables and a CA bundle, and the terminal when it has
one (its own process group in the foreground, as a shell would run it), so Ctrl-C reaches it once,
and a SIGTERM, SIGINT or SIGHUP sent to `durable` is passed to it. The exit status is the agent's
(128 + the signal when a signal ended it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import types
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg

from ..store import database
from . import launcher, watchdog

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PROXY_CHECK_S = 1.5  # a sidecar on this machine or the next answers its health check well within this


class Failure(RuntimeError):
    """Something to fix before the agent can run: one line saying what."""


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class Plan:
    run: str
    attempt: str
    command: list[str]
    dsn: str | None
    options: dict[str, str]
    confdir: Path | None  # None: $DURABLE_HOME/certs, or the CA the sidecar at `proxy` serves
    proxy: str | None
    token: str | None


def check_journal(dsn: str | None) -> database.Target:
    """The journal answers, or a Failure saying which one does not (before any agent starts)."""
    try:
        target = database.resolve(dsn)
    except Exception as e:  # the embedded server would not start
        raise Failure(
            f"the embedded PostgreSQL did not start ({type(e).__name__}: {e}); "
            f"see {database.durable_home() / 'pgdata' / 'log'}, or give --dsn"
        ) from e
    try:
        psycopg.connect(target.dsn, connect_timeout=1).close()
    except psycopg.Error as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Failure(
            f"the journal does not answer ({database.describe(target.dsn)}, from {target.origin}): "
            f"{first}; start PostgreSQL or fix --dsn / $DATABASE_URL"
        ) from e
    return target


def host_port(proxy: str) -> str:
    return proxy.split("://")[-1].split("@")[-1].rstrip("/")


def fetch_ca(address: str, proxy: str) -> bytes:
    """The CA the sidecar at `address` signs with, asked of that sidecar (after its health check)
    through `proxy`, its URL with the run's credentials (a sidecar with a secret asks for them)."""
    ready, why = launcher.health(address, timeout=PROXY_CHECK_S)
    if not ready:
        hint = "start one with `durable proxy --port PORT`" if "refused" in why or "timed out" in why else "see its log"
        raise Failure(f"no serving sidecar at {address} ({why}); {hint}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))
    try:
        with opener.open(launcher.CA_URL, timeout=PROXY_CHECK_S) as answer:
            return answer.read()
    except urllib.error.HTTPError as e:
        if e.code == 407:
            raise Failure(
                f"the sidecar at {address} has an auth secret and hands its CA only with a run's token: "
                "set DURABLE_AUTH_SECRET to its secret"
            ) from e
        raise Failure(f"the sidecar at {address} did not hand out its CA ({e}); is it a durable-sidecar?") from e
    except (urllib.error.URLError, OSError) as e:
        raise Failure(f"the sidecar at {address} did not hand out its CA ({e}); is it a durable-sidecar?") from e


def check_ca(pem: bytes, confdir: Path | None, address: str) -> None:
    """A --confdir given with --proxy must hold the CA that proxy uses, or TLS fails inside the agent."""
    if confdir is None:
        return
    mine = confdir / launcher.CA_CERT
    if not mine.exists() or mine.read_bytes().strip() != pem.strip():
        raise Failure(
            f"{mine} is not the CA the sidecar at {address} signs with; "
            "leave out --confdir (durable run then takes the CA from the sidecar itself)"
        )


@contextmanager
def signals_forwarded(agent: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    """While the agent runs, SIGTERM/SIGINT/SIGHUP go to its process group; before it runs, they
    stop the start-up (Interrupted), so whatever was started is stopped on the way out."""

    def forward(signum: int, _frame: types.FrameType | None) -> None:
        if agent and agent[0].poll() is None:
            try:
                os.killpg(agent[0].pid, signum)
            except ProcessLookupError:
                pass
        elif not agent:
            raise Interrupted(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _terminal() -> int | None:
    """stdin's terminal, when `durable` runs in its foreground: the agent then gets it."""
    try:
        return 0 if os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp() else None
    except OSError:
        return None


def _give_terminal(fd: int, pgrp: int) -> None:
    handler = signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # a background group may not set it otherwise
    try:
        os.tcsetpgrp(fd, pgrp)
    except OSError:
        pass
    finally:
        signal.signal(signal.SIGTTOU, handler)


def start_agent(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """The agent in a process group of its own, in the terminal's foreground when there is one."""
    tty = _terminal()

    def in_child() -> None:
        os.setpgid(0, 0)
        if tty is not None:
            _give_terminal(tty, os.getpgrp())

    try:
        agent = subprocess.Popen(command, env=env, preexec_fn=in_child)
    except FileNotFoundError as e:
        raise Failure(f"the agent's command was not found: {command[0]}") from e
    if tty is not None:
        _give_terminal(tty, agent.pid)  # also here: whichever side runs first, the agent has it before it reads
    return agent


def exit_status(returncode: int) -> int:
    """The shell's convention: 128 + N for an agent ended by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def flush_replay_counts(proxy: str) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))
    try:
        opener.open(launcher.FLUSH_URL, timeout=PROXY_CHECK_S).close()
    except (urllib.error.URLError, OSError):
        pass  # an older sidecar: the summary may miss the last half second of replays


def drain_timeout(options: dict[str, str]) -> float:
    from ..steps import settings

    given = options.get("durable_drain_timeout")
    return settings.parse_duration(given) if given else settings.DEFAULTS.drain_timeout_s


@dataclass
class Outcome:
    status: int  # the agent's exit status, in the shell's convention
    attempt: str
    journal: database.Target | None  # None when a signal came before the agent started: nothing to sum up


def execute(plan: Plan) -> Outcome:
    """Run the plan. Raises Failure before the agent starts."""
    agent: list[subprocess.Popen[bytes]] = []
    sidecar: launcher.Sidecar | None = None
    target: database.Target | None = None
    tty = _terminal()
    with signals_forwarded(agent):
        try:
            if plan.proxy:
                address = host_port(plan.proxy)
                pem = fetch_ca(address, launcher.proxy_url(address, plan.run, plan.attempt, plan.token))
                check_ca(pem, plan.confdir, address)
                target = check_journal(plan.dsn)  # the summary reads it, and a sidecar elsewhere may not share it
            else:  # the sidecar boots (about a second, mostly imports) while the journal is checked
                with launcher.stop_signals_held():  # a signal meanwhile stops us below, the sidecar known
                    sidecar = launcher.start_sidecar(
                        plan.confdir or launcher.confdir_default(), plan.options, die_with_parent=True, wait=False
                    )
                try:
                    target = check_journal(plan.dsn)
                    sidecar.wait_serving()
                except launcher.SidecarFailed as e:
                    raise Failure(f"the sidecar did not start: {e.reason} (its log: {e.log_path})") from e
                except BaseException:
                    sidecar.kill()
                    raise
                address, pem = f"127.0.0.1:{sidecar.port}", sidecar.ca_cert.read_bytes()
            bundle = launcher.bundle_for(pem)
            url = launcher.proxy_url(address, plan.run, plan.attempt, plan.token)
            print(
                f"durable: run {plan.run}, attempt {plan.attempt}, proxy {address}"
                + (f", sidecar log {sidecar.log_path}" if sidecar else ""),
                file=sys.stderr,
            )
            agent.append(start_agent(plan.command, launcher.agent_env(url, bundle)))
            dog = watchdog.watch(agent[0].pid)  # should durable run be killed, the agent's group goes too
            code = agent[0].wait()  # a signal meanwhile is passed on by the handler, and the wait goes on
            watchdog.release(dog)
            if plan.proxy:
                flush_replay_counts(url)  # the summary reads them: a sidecar of our own writes them as it stops
        except Interrupted as e:
            code = -e.signum
            if not agent:
                target = None
        finally:
            if tty is not None:
                _give_terminal(tty, os.getpgrp())
            if sidecar:  # only once the agent has exited; a polite stop drains the calls it left in flight
                sidecar.stop(timeout=drain_timeout(plan.options) + 5)
    return Outcome(exit_status(code), plan.attempt, target)
