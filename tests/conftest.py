"""Real parts for the tests: PostgreSQL, a local paid API over HTTP and HTTPS, mitmdump sidecars.

Test Postgres: `DATABASE_URL` when set, else a testcontainers Postgres when a Docker engine answers,
else the embedded PostgreSQL. Every test session works in a database of its own, dropped at the end.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
import requests

from durable_sidecar.store import database, embedded
from durable_sidecar.tools import launcher, operations

ROOT = Path(__file__).resolve().parent.parent
DEMO_AGENT = ROOT / "scripts" / "demo_agent.py"
sys.path.insert(0, str(ROOT / "scripts"))
import paid_api  # noqa: E402  (the upstream the tests bill against, run as a process of its own)

# sidecar logs, CA bundles and any embedded PostgreSQL of the tests stay out of the user's own home
os.environ["DURABLE_HOME"] = tempfile.mkdtemp(prefix="durable-test-home-")


def pytest_sessionfinish() -> None:
    shutil.rmtree(os.environ["DURABLE_HOME"], ignore_errors=True)


def docker_reachable() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A DSN with rights to create databases."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
    elif docker_reachable():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as pg:
            yield pg.get_connection_url()
    else:
        # outside pytest's tmp dirs, which a concurrent pytest session may prune; deleted at exit
        yield embedded.start(Path(tempfile.mkdtemp(prefix="durable-test-pg-")), cleanup="delete")


@pytest.fixture
def embedded_home() -> Iterator[Path]:
    """A DURABLE_HOME for a test that starts the embedded PostgreSQL, outside pytest's tmp dirs: a
    pytest session resets their permissions, and the server's own user (as root) must reach its data."""
    home = Path(tempfile.mkdtemp(prefix="durable-test-home-"))
    yield home
    embedded.stop(home)
    shutil.rmtree(home, ignore_errors=True)


PARTITIONS = int(os.environ.get("DURABLE_TEST_PARTITIONS") or 0)  # > 0: every journal hash-partitioned


def new_database(pg_server: str) -> str:
    """A database of its own; with DURABLE_TEST_PARTITIONS=N its journal is created partitioned first
    (`durable db init --partitions N`), so the same tests prove that layout."""
    dsn = database.create_database(pg_server, "durable_test")
    if PARTITIONS:
        operations.create_journal(dsn, PARTITIONS)
    return dsn


@pytest.fixture(scope="session")
def pg_dsn(pg_server: str) -> Iterator[str]:
    """This session's own database; tests keep apart by using run ids of their own."""
    dsn = new_database(pg_server)
    yield dsn
    database.drop_database(pg_server, dsn)


@pytest.fixture
def fresh_dsn(pg_server: str) -> Iterator[str]:
    """An empty database for one test (but for the journal's tables under DURABLE_TEST_PARTITIONS)."""
    dsn = new_database(pg_server)
    yield dsn
    database.drop_database(pg_server, dsn)


def sql(dsn: str, query: str, *params: Any) -> list[tuple]:
    """The rows of one statement (none for a statement that returns none), autocommitted."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def on_citus(dsn: str) -> bool:
    """Is this database on a Citus cluster (CI reruns the journal's tests on one, DATABASE_URL naming
    its coordinator: see tests/test_citus.py)?"""
    return bool(sql(dsn, "SELECT 1 FROM pg_extension WHERE extname = 'citus'"))


def fleet_benchmark(*args: str) -> tuple[dict[tuple[str, str], list[str]], str]:
    """scripts/bench_fleet.py with `args`: its table's rows by (layout, path), each the columns after
    those two (steps, steps/s, / floor, writes/s, p50, the CPU columns, bytes/step, tables, dense),
    and its whole output."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_fleet.py"), *args],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = {(line[7:27].strip(), line[28:37].strip()): line[38:].split() for line in out.stdout.splitlines()
            if line[:6].strip().isdigit()}
    return rows, out.stdout


# -- the paid API ---------------------------------------------------------------------------------


class PaidApi:
    def __init__(self, workdir: Path, tls: bool, port: int = 0, start: bool = True) -> None:
        self.workdir, self.tls = workdir, tls
        self.process: subprocess.Popen[bytes] | None = None
        self.port = port
        if start:
            self.start()

    def start(self) -> None:
        self.process, self.port = paid_api.spawn(self.workdir, tls=self.tls, port=self.port)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.workdir / "tls" / "ca.pem"

    def _direct(self, method: str, path: str, body: dict | None = None) -> dict:
        r = requests.request(method, self.url + path, verify=str(self.ca) if self.tls else True,
                             proxies={"http": "", "https": ""}, timeout=10, json=body)
        r.raise_for_status()
        return r.json()

    def books(self) -> dict:
        return self._direct("GET", "/_books")

    def reset(self) -> None:
        self._direct("POST", "/_reset")

    def fail_next(self, n: int) -> None:
        """The next n calls to /v1/flaky answer 503."""
        self._direct("POST", "/_config", {"flaky_failures": n})


@pytest.fixture(scope="session")
def _http_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PaidApi]:
    api = PaidApi(tmp_path_factory.mktemp("api-http"), tls=False)
    yield api
    api.stop()


@pytest.fixture(scope="session")
def _https_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PaidApi]:
    api = PaidApi(tmp_path_factory.mktemp("api-https"), tls=True)
    yield api
    api.stop()


@pytest.fixture
def http_api(_http_api: PaidApi) -> PaidApi:
    _http_api.reset()
    return _http_api


@pytest.fixture
def https_api(_https_api: PaidApi) -> PaidApi:
    _https_api.reset()
    return _https_api


# -- sidecars -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def confdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One sidecar CA for the session (mitmproxy makes it on first start)."""
    return tmp_path_factory.mktemp("confdir")


class Sidecars:
    """Starts sidecars for one test and kills whatever is left at its end."""

    def __init__(self, confdir: Path, dsn: str, upstream_ca: Path) -> None:
        self.confdir, self.dsn, self.upstream_ca = confdir, dsn, upstream_ca
        self.started: list[launcher.Sidecar] = []

    def start(self, env: dict[str, str] | None = None, journal_required: bool = True, listen_host: str = "127.0.0.1",
              **options: Any) -> launcher.Sidecar:
        # a 2 s lease grace instead of 10 s: these tests take over the steps of sidecars they SIGKILL,
        # and the grace's length is not what they test (tests/test_connection_failures.py runs the default)
        opts = {"durable_dsn": self.dsn, "ssl_verify_upstream_trusted_ca": str(self.upstream_ca),
                "durable_lease_grace": "2s"}
        opts.update({k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in options.items()})
        opts = {k: v for k, v in opts.items() if v != ""}
        sidecar = launcher.start_sidecar(self.confdir, opts, env=env, journal_required=journal_required,
                                         listen_host=listen_host)
        self.started.append(sidecar)
        return sidecar

    def close(self) -> None:
        for sidecar in self.started:
            sidecar.kill()


@pytest.fixture
def sidecars(confdir: Path, pg_dsn: str, _https_api: PaidApi) -> Iterator[Sidecars]:
    group = Sidecars(confdir, pg_dsn, _https_api.ca)
    yield group
    group.close()


@pytest.fixture
def ca_bundle(confdir: Path, sidecars: Sidecars, tmp_path: Path) -> Path:
    """System CAs + the sidecar CA (starting a sidecar first if none made the CA yet)."""
    if not (confdir / launcher.CA_CERT).exists():
        sidecars.start().stop()
    return launcher.write_ca_bundle(confdir / launcher.CA_CERT, tmp_path / "bundle.pem")


def env_without_proxy(**extra: str) -> dict[str, str]:
    """This environment with no proxy or CA-bundle variable: what `durable run` or `durable env` must
    set by itself for an agent (plus `extra`)."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and k not in
           ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")}
    return {**env, **extra}


def on_a_terminal(argv: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """`argv` on a pseudo-terminal of its own (its controlling terminal, in its foreground) and the
    terminal's master end. util-linux `setsid --ctty` does it, so no Python runs in a forked child
    (pytest-xdist workers have threads, and forking them is what pty.fork would do)."""
    master, slave = os.openpty()
    proc = subprocess.Popen(["setsid", "--ctty", *argv], stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    return proc, master


def terminal_output(proc: subprocess.Popen[bytes], master: int, timeout: float = 60) -> bytes:
    """Everything written to the terminal until the process exits (then the terminal closes)."""
    output, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the last process holding the terminal is gone
                break
            if not chunk:
                break
            output += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=10)
    os.close(master)
    return output


def new_run() -> str:
    return f"run-{uuid.uuid4().hex[:12]}"


def run_agent(
    sidecar: launcher.Sidecar,
    bundle: Path,
    api: PaidApi,
    run: str,
    attempt: str,
    *,
    steps: int = 4,
    crash_after: int | None = None,
    random_keys: bool = False,
    may_fail: bool = False,
) -> tuple[int, list[dict]]:
    """Run the demo agent through the sidecar, configured only by environment; returns (exit code, calls).

    The agent may SIGKILL itself (crash_after); with may_fail it may also die of a dead sidecar.
    """
    args = [sys.executable, str(DEMO_AGENT), "--api", api.url, "--steps", str(steps), "--json"]
    if crash_after is not None:
        args += ["--crash-after", str(crash_after)]
    if random_keys:
        args.append("--random-keys")
    env = launcher.agent_env(sidecar.proxy_url(run, attempt), bundle)
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    calls = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode not in (0, -9) and not may_fail:
        raise AssertionError(f"agent failed ({proc.returncode}): {proc.stderr}\nsidecar log:\n{sidecar.log()[-3000:]}")
    return proc.returncode, calls


def eventually(probe, expected, timeout: float = 10.0):
    """Poll `probe()` until it returns `expected` (journaling after a client hangs up is asynchronous)."""
    deadline = time.monotonic() + timeout
    while (value := probe()) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def runs_around_cutoff(sidecar: launcher.Sidecar, api: PaidApi, dsn: str, cutoff_days: int) -> dict[str, str]:
    """Recorded runs on both sides of a retention cutoff (for gc and retention):
    `old` idle for cutoff+3 days (the only one to delete), `inside` idle for cutoff-1 days, `replayed`
    recorded cutoff+3 days ago but replayed just now, `fresh` recorded now."""
    runs = {name: new_run() for name in ("old", "inside", "replayed", "fresh")}
    for run in runs.values():
        requests.get(f"{api.url}/v1/search?q=aged", proxies={"http": sidecar.proxy_url(run, "a1")}, timeout=30)
    for name, days in (("old", cutoff_days + 3), ("inside", cutoff_days - 1), ("replayed", cutoff_days + 3)):
        sql(dsn, "UPDATE durable_runs SET updated_at = now() - make_interval(days => %s) WHERE id = %s RETURNING 1",
            days, runs[name])
        sql(dsn, "UPDATE durable_steps SET started_at = now() - make_interval(days => %s), completed_at ="
            " now() - make_interval(days => %s), replayed_at = NULL WHERE run_id = %s RETURNING 1", days, days, runs[name])
    again = requests.get(f"{api.url}/v1/search?q=aged", proxies={"http": sidecar.proxy_url(runs["replayed"], "a2")}, timeout=30)
    assert again.headers["Durable-Outcome"] == "replayed"
    replayed_now = "SELECT replayed_at > now() - interval '1 minute' FROM durable_steps WHERE run_id = %s"
    assert eventually(lambda: sql(dsn, replayed_now, runs["replayed"]), [(True,)]) == [(True,)]  # written in the background
    return runs


def wait_for(path: Path, timeout: float = 60) -> str:
    """The text of `path` once something writes it (AssertionError after `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.05)
    raise AssertionError(f"{path} was never written")


def gone(pids: list[int], timeout: float = 15) -> list[int]:
    """The pids still alive after `timeout` (zombies count as gone: nothing runs)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)
