"""Start a sidecar process and hand an agent what it needs to use it, without touching the agent.

Used by the demo, the tests and the `durable` CLI: a real `mitmdump -s addon/durable.py` process on
127.0.0.1, and the environment an unmodified agent needs (proxy variables with the run credentials,
a CA bundle that holds the system CAs plus the sidecar's CA).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from ..store import database

SCRIPT = Path(__file__).resolve().parents[1] / "durable.py"
CA_CERT = "mitmproxy-ca-cert.pem"
HEALTH_URL = "http://durable.sidecar/health"  # answered by the addon itself (sidecar.HEALTH_HOST)
CA_URL = "http://durable.sidecar/ca.pem"  # the CA that sidecar signs with
FLUSH_URL = "http://durable.sidecar/flush"  # write the replay counts gathered so far
KEPT_LOGS = 20  # sidecar logs kept in $DURABLE_HOME/logs, newest first


def confdir_default() -> Path:
    """The one place the sidecar's CA lives unless told otherwise: `$DURABLE_HOME/certs`."""
    return database.durable_home() / "certs"


def logs_dir() -> Path:
    return database.durable_home() / "logs"


class SidecarFailed(RuntimeError):
    """The sidecar exited or did not serve in time; `reason` is the line that says why."""

    def __init__(self, reason: str, log_path: Path, tail: str) -> None:
        super().__init__(f"{reason} (log: {log_path}):\n{tail}")
        self.reason, self.log_path = reason, log_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mitmdump() -> str:
    """The mitmdump next to this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).with_name("mitmdump")
    found = str(beside) if beside.exists() else shutil.which("mitmdump")
    if not found:
        raise FileNotFoundError("mitmdump not found: pip install durable-sidecar (it brings mitmproxy)")
    return found


@dataclass
class Sidecar:
    process: subprocess.Popen[bytes]
    port: int
    confdir: Path
    log_path: Path
    listen_host: str = "127.0.0.1"

    def wait_serving(self, timeout: float = 60, journal_required: bool = True) -> None:
        """Until it serves (see start_sidecar); killed on the way out if it does not."""
        try:
            _wait_serving(self, f"{self.listen_host}:{self.port}", timeout, journal_required)
        except BaseException:
            self.kill()
            raise

    def proxy_url(self, run: str, attempt: str, token: str | None = None) -> str:
        return proxy_url(f"127.0.0.1:{self.port}", run, attempt, token)

    @property
    def ca_cert(self) -> Path:
        return self.confdir / CA_CERT

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 10) -> None:
        """Polite shutdown (SIGINT), then SIGKILL if it lingers."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """A crash: SIGKILL, no chance to clean up."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def proxy_url(host_port: str, run: str, attempt: str, token: str | None = None) -> str:
    """`http://RUN:ATTEMPT[~TOKEN]@HOST:PORT`: the credentials carry the identity (and the run's token)."""
    password = attempt + (f"~{token}" if token else "")
    return f"http://{quote(run, safe='')}:{quote(password, safe='~')}@{host_port}"


def start_sidecar(
    confdir: Path,
    options: dict[str, str] | None = None,
    *,
    log_path: Path | None = None,
    port: int | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    listen_host: str = "127.0.0.1",
    journal_required: bool = True,
    die_with_parent: bool = False,
    wait: bool = True,
) -> Sidecar:
    """Start mitmdump with the durable addon and wait until it serves: listening, with the addon
    loaded, the journal reachable and its lease held (its health answer), or raise SidecarFailed.
    With `journal_required` false, an addon answering that its journal is down counts as started.
    With `die_with_parent` (Linux), the sidecar gets SIGTERM should the caller die, SIGKILL included.
    With `wait` false it returns at once: the caller does other work, then `wait_serving`."""
    confdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = log_path or new_log_path(port)
    args = [mitmdump(), "-s", str(SCRIPT), "--listen-host", listen_host, "-p", str(port), "--set", f"confdir={confdir}"]
    for key, value in (options or {}).items():
        args += ["--set", f"{key}={value}"]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_term_with_parent if die_with_parent else None,
        )
    sidecar = Sidecar(process, port, confdir, log_path, listen_host)
    if wait:
        sidecar.wait_serving(timeout, journal_required)
    return sidecar


def _wait_serving(sidecar: Sidecar, address: str, timeout: float, journal_required: bool) -> None:
    deadline = time.monotonic() + timeout
    why = "not listening yet"
    while time.monotonic() < deadline:
        if sidecar.process.poll() is not None:
            log = sidecar.log()
            lines = [line.strip() for line in log.splitlines() if line.strip()]
            reason = next(
                (line for line in lines if "configuration error" in line),
                lines[-1] if lines else f"exit status {sidecar.process.returncode}",
            )
            raise SidecarFailed(
                f"sidecar exited with {sidecar.process.returncode}: {reason}", sidecar.log_path, log[-3000:]
            )
        ready, why = health(address)  # refused until it listens; 502 until the addon loaded
        if ready or (not journal_required and "durable-sidecar" in why):
            return
        time.sleep(0.05)
    raise SidecarFailed(
        f"sidecar on {address} did not serve within {timeout}s ({why})", sidecar.log_path, sidecar.log()[-3000:]
    )


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@contextmanager
def stop_signals_held() -> Iterator[None]:
    """Hold SIGTERM, SIGINT and SIGHUP in this process while it starts a sidecar: delivered as the
    block ends, not while Popen runs its at-fork hooks, where Python swallows what a handler raises
    (`durable run`'s stops its start-up so). The sidecar lets them through again (`_term_with_parent`)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _term_with_parent() -> None:
    """In the sidecar's process, before exec: SIGTERM when the launcher dies (prctl PR_SET_PDEATHSIG),
    and the stop signals the launcher may hold while it forks let through."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def new_log_path(port: int) -> Path:
    """$DURABLE_HOME/logs/sidecar-TIME-PORT.log; only the newest KEPT_LOGS are kept."""
    folder = logs_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for old in sorted(folder.glob("sidecar-*.log"), key=lambda p: p.stat().st_mtime, reverse=True)[KEPT_LOGS - 1 :]:
        old.unlink(missing_ok=True)
    return folder / f"sidecar-{time.strftime('%Y%m%d-%H%M%S')}-{port}.log"


def health(host_port: str, timeout: float = 10) -> tuple[bool, str]:
    """Ask a sidecar whether it serves: (ready, why not)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": f"http://{host_port}"}))
    try:
        with opener.open(HEALTH_URL, timeout=timeout) as answer:
            return answer.status == 200, ""
    except urllib.error.HTTPError as e:
        try:
            body = e.read().decode(errors="replace")
        finally:
            e.close()
        return False, f"{e.code}: {body.strip()[:300]}"
    except OSError as e:
        return False, str(e)


def system_ca_file() -> Path | None:
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt", "/etc/ssl/cert.pem"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    try:
        import certifi

        return Path(certifi.where())
    except ImportError:
        return None


def bundle_text(ca_pem: bytes) -> str:
    """System CAs + the sidecar's CA in one file: SSL_CERT_FILE replaces the default store, so both."""
    system = system_ca_file()
    return "\n".join([*([system.read_text()] if system else []), ca_pem.decode()])


def write_ca_bundle(sidecar_ca: Path, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(bundle_text(sidecar_ca.read_bytes()))
    return out


def bundle_for(ca_pem: bytes) -> Path:
    """The bundle for this CA, one file per CA under $DURABLE_HOME/bundles (written atomically: runs
    starting at once never read half a bundle)."""
    path = database.durable_home() / "bundles" / f"ca-bundle-{hashlib.sha256(ca_pem.strip()).hexdigest()[:16]}.pem"
    text = bundle_text(ca_pem)
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path


CLEARED = ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "SSL_CERT_DIR")  # the bundle is the whole truth


def agent_variables(proxy_url: str, ca_bundle: Path) -> dict[str, str]:
    """What an unmodified agent needs set: proxy variables (every spelling clients read) and the CA
    bundle (every variable clients read). NODE_USE_ENV_PROXY makes Node's built-in fetch honour the
    proxy variables (Node 22.21+, 24.5+)."""
    proxies = dict.fromkeys(("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"), proxy_url)
    bundles = dict.fromkeys(
        ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"), str(ca_bundle)
    )
    return {**proxies, **bundles, "NODE_USE_ENV_PROXY": "1"}


def agent_env(proxy_url: str, ca_bundle: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment that routes an unmodified agent through the sidecar and makes it trust the CA."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in CLEARED}
    return {**env, **agent_variables(proxy_url, ca_bundle)}
