"""The README's "Put it in front of your agent" blocks, run as written against a local HTTPS upstream:
the sidecar started by its line, the agent's shell set up by its lines, a crash and a resume.

Two changes only, both stated here: port 8080 becomes a free port (CI may have 8080 taken), and the
`pip install -e .` line is skipped (the test already runs from the installed package).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from durable_sidecar.tools import launcher
from conftest import ROOT, PaidApi, env_without_proxy

SECTION = "## Put it in front of your agent"
AGENT = """\
import os, pathlib, requests
marker = pathlib.Path("crashed-once")
for amount in (1, 2):
    r = requests.post(os.environ["API_URL"] + "/v1/payments", json={"amount": amount}, timeout=30)
    print(r.headers["Durable-Outcome"], flush=True)
    if not marker.exists():
        marker.touch()
        os.kill(os.getpid(), 9)
"""


def readme_blocks(heading: str = SECTION) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, re.S)


def test_the_readme_blocks_put_an_agent_behind_the_sidecar_as_written(
    https_api: PaidApi, fresh_dsn: str, tmp_path: Path
) -> None:
    start, agent_shell = readme_blocks()
    port = str(launcher.free_port())
    install, proxy_line = [line for line in start.splitlines() if line.strip()]
    assert install.startswith("pip install -e .") and "Python >= 3.12" in (ROOT / "README.md").read_text().split(SECTION)[1][:400]
    home = tmp_path / "home"
    (home / "certs").mkdir(parents=True)  # mitmproxy reads options from config.yaml in its confdir
    (home / "certs" / "config.yaml").write_text(f"ssl_verify_upstream_trusted_ca: {https_api.ca}\n")
    env = env_without_proxy()
    env |= {"DURABLE_HOME": str(home), "DATABASE_URL": fresh_dsn, "API_URL": https_api.url,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}
    sidecar = subprocess.Popen(["bash", "-c", proxy_line.replace("8080", port)], env=env, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not launcher.health(f"127.0.0.1:{port}", timeout=2)[0]:
            assert sidecar.poll() is None and time.monotonic() < deadline, sidecar.stdout.read().decode()  # type: ignore[union-attr]
            time.sleep(0.1)
        (tmp_path / "my_agent.py").write_text(AGENT)
        shell = agent_shell.replace("8080", port)
        crashed = subprocess.run(["bash", "-c", shell], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert crashed.returncode in (137, -9) and crashed.stdout.split() == ["recorded"], crashed.stderr
        resumed = subprocess.run(["bash", "-c", shell], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert resumed.returncode == 0 and resumed.stdout.split() == ["replayed", "recorded"], resumed.stderr
    finally:
        os.killpg(sidecar.pid, 9)
        sidecar.wait()
    assert https_api.books()["charges"] == 2  # one per payment: the crash cost nothing twice


PAYING_AGENT = """\
import os, requests
r = requests.post(os.environ["API_URL"] + "/v1/payments", json={"amount": 5}, timeout=30)
assert r.status_code == 201, r.text
"""


def test_the_readme_turns_a_run_into_a_regression_test_as_written(
    http_api: PaidApi, fresh_dsn: str, tmp_path: Path
) -> None:
    """The README's "A recorded run as a regression test" block, line by line as written, with an
    agent.py that pays once: recorded live (one charge), then replayed offline (no second one),
    passing, with its JUnit file written."""
    [block] = readme_blocks("## A recorded run as a regression test")
    (tmp_path / "agent.py").write_text(PAYING_AGENT)
    env = env_without_proxy()
    env |= {"DURABLE_HOME": str(tmp_path / "home"), "DATABASE_URL": fresh_dsn, "API_URL": http_api.url,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}
    for line in (line.split("#")[0].strip() for line in block.splitlines()):
        done = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (line, done.stderr)
    assert http_api.books()["charges"] == 1
    assert (tmp_path / "agent.jsonl").exists() and "<failure" not in (tmp_path / "out.xml").read_text()
