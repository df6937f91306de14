"""Start a sidecar process and hand an agent what it needs to use it, without touching the agent.

Used by the demo, the tests and the `durable` CLI: a real `mitmdump -s addon/durable.py` process on
127.0.0.1, and the environment an unmodified agent needs (proxy variables with the run credentials,
a CA bundle that holds the system CAs plus the sidecar's CA).
"""

from __future__ import annotations

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
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

SCRIPT = Path(__file__).with_name("durable.py")
CA_CERT = "mitmproxy-ca-cert.pem"
HEALTH_URL = "http://durable.sidecar/health"  # answered by the addon itself (sidecar.HEALTH_HOST)


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
) -> Sidecar:
    """Start mitmdump with the durable addon and wait until it serves: listening, with the addon
    loaded, the journal reachable and its lease held (its health answer), or raise saying why not.
    With `journal_required` false, an addon answering that its journal is down counts as started."""
    confdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = log_path or confdir / f"sidecar-{port}.log"
    args = [mitmdump(), "-s", str(SCRIPT), "--listen-host", listen_host, "-p", str(port), "--set", f"confdir={confdir}"]
    for key, value in (options or {}).items():
        args += ["--set", f"{key}={value}"]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    sidecar = Sidecar(process, port, confdir, log_path)
    deadline = time.monotonic() + timeout
    why = "not listening yet"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sidecar exited with {process.returncode}:\n{sidecar.log()[-3000:]}")
        ready, why = health(f"{listen_host}:{port}")  # refused until it listens; 502 until the addon loaded
        if ready or (not journal_required and "durable-sidecar" in why):
            return sidecar
        time.sleep(0.05)
    sidecar.kill()
    raise TimeoutError(f"sidecar on {port} did not serve within {timeout}s ({why}):\n{sidecar.log()[-3000:]}")


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


def write_ca_bundle(sidecar_ca: Path, out: Path) -> Path:
    """System CAs + the sidecar's CA in one file: SSL_CERT_FILE replaces the default store, so both."""
    parts = []
    system = system_ca_file()
    if system:
        parts.append(system.read_text())
    parts.append(sidecar_ca.read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts))
    return out


def agent_env(proxy_url: str, ca_bundle: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment that routes an unmodified agent through the sidecar and makes it trust the CA."""
    env = dict(os.environ if base is None else base)
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(name, None)
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        env[name] = proxy_url
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"):
        env[name] = str(ca_bundle)
    env.pop("SSL_CERT_DIR", None)  # the bundle is the whole truth
    return env
