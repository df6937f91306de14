"""The package as a user installs it, with no checkout: `python -m build` (no warnings), the wheel
installed into a fresh venv outside the repository, `durable` from it, and the addon loaded into
that venv's own mitmdump by `durable addon-path`, recording and replaying one call."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from conftest import ROOT, PaidApi, new_run
from durable_sidecar.tools import launcher


# what a checkout holds that is no source of the package: the copy the build runs on leaves it out
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv*", ".mutmut*", "__pycache__", "*.egg-info", "build", "dist",
                                    ".pytest_cache", ".hypothesis", ".durable", "html", "*.whl")


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built from a copy of the checkout: setuptools writes its egg-info and release tree next to
    the sources, and the two test processes each build (two builds in one tree broke one in CI)."""
    work = tmp_path_factory.mktemp("wheel")
    source = shutil.copytree(ROOT, work / "source", ignore=NOT_SOURCE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPATH")}
    built = subprocess.run([sys.executable, "-m", "build", "--outdir", str(work / "dist"), str(source)],
                           capture_output=True, text=True, env=env, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    output = built.stdout + built.stderr
    assert [line for line in output.splitlines() if "warning" in line.lower()] == []
    (wheel,) = (work / "dist").glob("durable_sidecar-*.whl")
    assert list((work / "dist").glob("durable_sidecar-*.tar.gz"))
    venv = work / "venv"
    base = getattr(sys, "_base_executable", sys.executable)  # the interpreter behind this venv
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                                "--disable-pip-version-check", str(wheel)],
                               capture_output=True, text=True, cwd=work, env=env, timeout=900)
    assert installed.returncode == 0, installed.stderr
    return venv


def test_the_wheel_gives_durable_and_an_addon_for_your_own_mitmproxy(
    wheel_venv: Path, http_api: PaidApi, fresh_dsn: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DATABASE_URL")}
    env["DURABLE_HOME"] = str(tmp_path / "home")
    durable = str(wheel_venv / "bin" / "durable")

    def run(*args: str) -> str:
        return subprocess.run([durable, *args], capture_output=True, text=True, check=True, env=env,
                              cwd=tmp_path).stdout.strip()

    assert run("--version") == "durable 0.1.0"
    script = Path(run("addon-path"))
    assert script.is_file() and wheel_venv in script.parents and ROOT not in script.parents
    assert (script.parent / "tools" / "templates" / "run.html").is_file()  # the pages of `durable ui` came along
    port = launcher.free_port()
    with open(tmp_path / "mitmdump.log", "wb") as log:
        sidecar = subprocess.Popen([str(wheel_venv / "bin" / "mitmdump"), "-s", str(script), "-p", str(port),
                                    "--set", f"confdir={tmp_path / 'certs'}", "--set", f"durable_dsn={fresh_dsn}"],
                                   stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not launcher.health(f"127.0.0.1:{port}", timeout=2)[0]:
            assert sidecar.poll() is None and time.monotonic() < deadline, (tmp_path / "mitmdump.log").read_text()
            time.sleep(0.1)
        run_id = new_run()
        outcomes = []
        for attempt in ("a1", "a2"):
            proxy = launcher.proxy_url(f"127.0.0.1:{port}", run_id, attempt)
            r = requests.get(f"{http_api.url}/v1/search?q=wheel", proxies={"http": proxy}, timeout=30)
            outcomes.append(r.headers["Durable-Outcome"])
        assert outcomes == ["recorded", "replayed"]
        assert http_api.books()["calls"] == 1
    finally:
        sidecar.kill()
        sidecar.wait()
    assert str(ROOT / "addon") not in (tmp_path / "mitmdump.log").read_text()  # nothing from the checkout


def test_the_wheel_starts_and_stops_the_embedded_postgresql(
    wheel_venv: Path, http_api: PaidApi, embedded_home: Path, tmp_path: Path
) -> None:
    """From the wheel, with no DSN anywhere: `durable run` starts the embedded PostgreSQL, journals
    the agent's call in it, and once the run is over the watcher stops the server (its last user is
    gone). The watcher is this package loaded as a package, never a module run as a script (one
    named like a standard-library module would have shadowed it, and the watcher died at start)."""
    import json

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DATABASE_URL")}
    env["DURABLE_HOME"] = str(embedded_home)
    durable = str(wheel_venv / "bin" / "durable")
    agent = ("import urllib.request; print(urllib.request.urlopen(urllib.request.Request("
             f"'{http_api.url}/v1/echo', data=b'wheel')).headers['Durable-Outcome'])")
    done = subprocess.run([durable, "run", "--run", new_run(), "--", str(wheel_venv / "bin" / "python"), "-c", agent],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "recorded", done.stderr

    def status() -> dict:
        out = subprocess.run([durable, "db", "status", "--json"], capture_output=True, text=True, env=env,
                             cwd=tmp_path, check=True).stdout
        return json.loads(out)

    deadline = time.monotonic() + 20
    while (now := status())["running"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not now["running"], now


def test_no_module_of_the_package_is_named_after_a_standard_library_module() -> None:
    """A module named like the standard library's (`operator.py` was one) shadows it wherever the
    package's folder comes first on the path, which is how the embedded watcher once died."""
    modules = {p.stem for p in (ROOT / "addon").rglob("*.py")}
    assert sorted(modules & sys.stdlib_module_names) == []
