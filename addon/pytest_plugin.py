"""pytest plugin (entry point `pytest11`: on once the package is installed): a recorded run replayed
for the code under test, in the test's own process.

    @pytest.mark.durable("fixtures/weather.jsonl")   # relative to the test's file
    def test_weather(durable):
        assert "sunny" in weather_agent("Paris")     # any SDK made inside the test uses the sidecar

While the test runs, the proxy variables point at a sidecar (started once per session) with the
test's own scratch run, and SSL_CERT_FILE / REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE at a bundle that
trusts its CA: the openai and anthropic SDKs, httpx and requests made in the test pick them up.
The fixture is replayed offline (`durable test`'s rules): the test fails with the same report when
the code makes a call the recording lacks or leaves a recorded call unmade. When the file does not
exist yet the test runs live and records it (vcrpy's `once`). Options: `--durable-record-mode`
(none, once, new_episodes, all), `--durable-dsn` (else $DATABASE_URL, else the embedded
PostgreSQL), `--durable-set KEY=VALUE` (a sidecar option, repeatable).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

MARKER = "durable"
RECORD_MODES = ("none", "once", "new_episodes", "all")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("durable", "durable-sidecar fixtures (durable test)")
    group.addoption(
        "--durable-record-mode",
        choices=RECORD_MODES,
        default="once",
        help="none: replay offline; once (default): record a fixture that does not exist yet; new_episodes: "
        "calls a fixture lacks go live and are added; all: record every fixture afresh",
    )
    group.addoption("--durable-dsn", default=None, help="the journal (default: $DATABASE_URL, else embedded)")
    group.addoption("--durable-set", action="append", default=[], metavar="KEY=VALUE", help="a sidecar option")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}(path): replay this durable fixture (durable test) for the test")


class Sidecars:
    """At most two sidecars for the session, started when first needed: one offline, one live."""

    def __init__(self, dsn: str | None, options: dict[str, str]) -> None:
        self.dsn, self.options = dsn, options
        self.started: dict[bool, Any] = {}

    def get(self, offline: bool) -> Any:
        from .tools import launcher

        if offline not in self.started:
            options = {**self.options, "durable_offline": "true" if offline else "false"}
            if self.dsn:
                options["durable_dsn"] = self.dsn
            self.started[offline] = launcher.start_sidecar(launcher.confdir_default(), options)
        return self.started[offline]

    def stop(self) -> None:
        for sidecar in self.started.values():
            sidecar.stop()


@dataclass
class Durable:
    """One test's replay (or recording): what the test may look at, and the verdict after it."""

    path: Path
    mode: str  # none | new_episodes | all (once is settled by whether the file exists)
    run: str
    attempt: str
    proxy_url: str
    ca_bundle: Path
    dsn: str | None
    recorded: int = 0  # steps loaded from the fixture

    def finish(self) -> Any:
        """Write a recording (None), or the replay's report (testing.Report)."""
        from .tools import fixture, operations, runner, testing

        runner.flush_replay_counts(self.proxy_url)  # the report reads which steps this attempt used
        with operations.connect(self.dsn, migrate=False) as conn:
            if self.mode == "all":
                fixture.save(conn, self.run, self.path)
                return None
            result = testing.report(conn, self.run, self.recorded, str(self.path), None, self.mode == "new_episodes")
            if self.mode == "new_episodes" and result.extra:
                fixture.save(conn, self.run, self.path)
        return result


@pytest.fixture(scope="session")
def _durable_sidecars(pytestconfig: pytest.Config) -> Iterator[Sidecars]:
    options = dict(pair.partition("=")[::2] for pair in pytestconfig.getoption("durable_set"))
    sidecars = Sidecars(pytestconfig.getoption("durable_dsn"), options)
    yield sidecars
    sidecars.stop()


@pytest.fixture
def durable(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, _durable_sidecars: Sidecars
) -> Iterator[Durable]:
    """The test's calls answered from the fixture its `durable` marker names (recorded when absent)."""
    from .tools import fixture, launcher, operations, testing

    marker = request.node.get_closest_marker(MARKER)
    if marker is None or not marker.args:
        raise pytest.UsageError('the durable fixture needs @pytest.mark.durable("path/to/fixture.jsonl")')
    path = Path(request.path).parent / marker.args[0]
    mode = request.config.getoption("durable_record_mode")
    if mode == "once":
        mode = "none" if path.exists() else "all"
    run, dsn = testing.scratch_run(), _durable_sidecars.dsn
    recorded = 0  # steps 1..recorded of the scratch run are the fixture's
    if mode != "all":
        loaded = fixture.read(path)
        with operations.connect(dsn) as conn:
            fixture.load(conn, run, loaded, labels={"fixture": str(path)})
        recorded = loaded.last_seq
    sidecar = _durable_sidecars.get(offline=mode == "none")
    attempt = "record" if mode == "all" else testing.ATTEMPT
    url = launcher.proxy_url(f"127.0.0.1:{sidecar.port}", run, attempt)
    bundle = launcher.bundle_for(sidecar.ca_cert.read_bytes())
    for name in launcher.CLEARED:
        monkeypatch.delenv(name, raising=False)
    for name, value in launcher.agent_variables(url, bundle).items():
        monkeypatch.setenv(name, value)
    yield Durable(path, mode, run, attempt, url, bundle, dsn, recorded)
    with operations.connect(dsn, migrate=False) as conn:
        operations.remove(conn, run)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """After a test that used the `durable` fixture: the replay's verdict. A test that failed by
    itself (often on the 404 of a call the recording lacks) gets the report as a section."""
    session = getattr(item, "funcargs", {}).get("durable")
    try:
        result = yield
    except BaseException:
        if isinstance(session, Durable) and (report := session.finish()) is not None:
            item.add_report_section("call", "durable test", report.text())
        raise
    if isinstance(session, Durable):
        report = session.finish()
        if report is not None and session.mode == "none" and not report.passed:
            raise AssertionError(report.text())
    return result
