"""`durable ui` in a real browser: headless Chromium (Debian's package) driven by Playwright, over a
journal filled by a real sidecar: the runs list, a run's timeline and steps, a step's detail, a live
update, and each action (fork, edit, resolve, delete, download) taking effect in the journal."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from canned import Canned, canned_server
from conftest import PaidApi, Sidecars, eventually, new_run, sql
from durable_sidecar.tools import launcher

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
DURABLE = str(Path(sys.executable).with_name("durable"))


def chat(sidecar: launcher.Sidecar, api: PaidApi, run: str, attempt: str, n: int) -> str:
    r = requests.post(f"{api.url}/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": f"q{n}"}]},
                      proxies={"http": sidecar.proxy_url(run, attempt)}, timeout=30)
    return r.headers["Durable-Outcome"]


@pytest.fixture
def crashed_and_resumed(sidecars: Sidecars, http_api: PaidApi) -> tuple[launcher.Sidecar, str]:
    """A run whose first attempt recorded 3 calls, and whose second replayed them and recorded a 4th."""
    sidecar = sidecars.start()
    run = new_run()
    assert [chat(sidecar, http_api, run, "a1", n) for n in range(3)] == ["recorded"] * 3
    assert [chat(sidecar, http_api, run, "a2", n) for n in range(4)] == ["replayed"] * 3 + ["recorded"]
    counted = "SELECT sum(replay_count) FROM durable_steps WHERE run_id = %s"
    assert eventually(lambda: sql(sidecars.dsn, counted, run), [(3,)]) == [(3,)]  # written in the background
    return sidecar, run


def start_ui(dsn: str, **env: str) -> Iterator[str]:
    port = launcher.free_port()
    proc = subprocess.Popen([DURABLE, "ui", "--dsn", dsn, "--port", str(port)], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                requests.get(base, timeout=1)
                break
            except requests.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()  # type: ignore[union-attr]
                time.sleep(0.1)
        yield base
    finally:  # also when a failing test drops the generator
        proc.kill()
        proc.wait()


@pytest.fixture
def ui(pg_dsn: str) -> Iterator[str]:
    yield from start_ui(pg_dsn)


@pytest.fixture
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def test_runs_timeline_and_a_step_in_the_browser(ui: str, browser, crashed_and_resumed) -> None:
    _, run = crashed_and_resumed
    page = browser.new_page()
    page.goto(f"{ui}/?prefix={run}")
    row = page.locator("#runs tr", has_text=run)
    assert row.count() == 1 and row.locator("td").nth(7).inner_text() == "3"  # calls replay saved
    row.locator("a").click()
    page.wait_for_url(f"{ui}/runs/{run}")
    outcomes = [page.locator("rect.bar").nth(i).get_attribute("class") for i in range(page.locator("rect.bar").count())]
    assert outcomes == ["bar replayed"] * 3 + ["bar recorded"]  # the crash and the resume, on the timeline
    assert page.locator("tr.step").count() == 4
    page.locator("tr.step").first.locator("a").click()
    page.wait_for_url(f"{ui}/runs/{run}/steps/1")
    assert '"content": "q0"' in page.locator("#request-body").inner_text()
    assert '"choices"' in page.locator("#response-body").inner_text()


def test_a_new_step_appears_without_a_reload(ui: str, browser, crashed_and_resumed, http_api: PaidApi) -> None:
    sidecar, run = crashed_and_resumed
    page = browser.new_page()
    page.goto(f"{ui}/runs/{run}")
    assert page.locator("tr.step").count() == 4
    page.evaluate("window.notReloaded = true")
    assert chat(sidecar, http_api, run, "a2", 4) == "recorded"
    page.locator("tr.step").nth(4).wait_for(timeout=15_000)
    assert page.locator("tr.step").count() == 5 and page.evaluate("window.notReloaded") is True


def test_fork_edit_resolve_delete_and_download_from_the_browser(
    ui: str, browser, crashed_and_resumed, pg_dsn: str
) -> None:
    _, run = crashed_and_resumed
    fork = new_run()
    page = browser.new_page(accept_downloads=True)
    page.goto(f"{ui}/runs/{run}")

    with page.expect_download() as har:
        page.get_by_text("HAR", exact=True).click()
    assert len(json.loads(Path(har.value.path()).read_text())["log"]["entries"]) == 4

    page.fill("input[name=at]", "2")
    page.fill("input[name=to]", fork)
    page.locator("form[action$='/fork'] input[name=confirm]").check()
    page.locator("form[action$='/fork'] button").click()
    page.wait_for_url(f"{ui}/runs/{fork}")
    assert page.locator("tr.step").count() == 2
    assert sql(pg_dsn, "SELECT count(*) FROM durable_steps WHERE run_id = %s", fork) == [(2,)]

    page.goto(f"{ui}/runs/{fork}/steps/1")  # edit the fork's answer
    page.fill("form[action$='/edit'] input[name=status]", "201")
    page.fill("form[action$='/edit'] textarea[name=body]", '{"edited": true}')
    page.locator("form[action$='/edit'] input[name=confirm]").check()
    page.locator("form[action$='/edit'] button").click()
    page.wait_for_url(f"{ui}/runs/{fork}/steps/1")
    assert sql(pg_dsn, "SELECT status, response_body FROM durable_steps WHERE run_id = %s AND seq = 1", fork) == [
        (201, b'{"edited": true}')]

    sql(pg_dsn, "UPDATE durable_steps SET state = 'pending' WHERE run_id = %s AND seq = 4 RETURNING 1", run)
    page.goto(f"{ui}/runs/{run}/steps/4")  # an in-doubt step (as a crash mid-call leaves it): approve its re-send
    page.check("input[name=how][value=reissue]")
    page.locator("form[action$='/resolve'] input[name=confirm]").check()
    page.locator("form[action$='/resolve'] button").click()
    page.goto(f"{ui}/runs/{run}/steps/4")
    assert "approved for re-send" in page.inner_text("body")  # the choice shows where it was made
    shown = subprocess.run([DURABLE, "show", run, "--dsn", pg_dsn, "--json"], capture_output=True, text=True, check=True)
    assert [s["approved"] for s in json.loads(shown.stdout)["steps"] if s["seq"] == 4] == [True]
    page.goto(f"{ui}/runs/{run}/steps/4")  # then think again: forget it
    page.check("input[name=how][value=forget]")
    page.locator("form[action$='/resolve'] input[name=confirm]").check()
    page.locator("form[action$='/resolve'] button").click()
    page.wait_for_url(f"{ui}/runs/{run}")
    assert sql(pg_dsn, "SELECT seq FROM durable_steps WHERE run_id = %s ORDER BY seq", run) == [(1,), (2,), (3,)]

    page.goto(f"{ui}/runs/{fork}")
    page.locator("form[action$='/delete'] button").click()  # not ticked: the page says so, nothing is deleted
    page.wait_for_load_state()
    assert "not confirmed: tick the confirm box" in page.inner_text("body")
    assert sql(pg_dsn, "SELECT count(*) FROM durable_runs WHERE id = %s", fork) == [(1,)]
    page.goto(f"{ui}/runs/{fork}")
    page.locator("form[action$='/delete'] input[name=confirm]").check()
    page.locator("form[action$='/delete'] button").click()
    page.wait_for_url(f"{ui}/")
    assert sql(pg_dsn, "SELECT count(*) FROM durable_runs WHERE id = %s", fork) == [(0,)]


def test_an_action_without_confirmation_or_token_changes_nothing(ui: str, crashed_and_resumed, pg_dsn: str) -> None:
    _, run = crashed_and_resumed
    r = requests.post(f"{ui}/runs/{run}/delete", data={"confirm": "yes"}, timeout=10)  # no XSRF token: refused
    assert r.status_code == 403
    session = requests.Session()
    page = session.get(f"{ui}/runs/{run}", timeout=10).text
    token = re.search(r'name="_xsrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    r = session.post(f"{ui}/runs/{run}/delete", data={"_xsrf": token}, timeout=10)  # not confirmed
    assert r.status_code == 400 and "confirm" in r.text
    assert sql(pg_dsn, "SELECT count(*) FROM durable_runs WHERE id = %s", run) == [(1,)]


def test_the_ui_asks_for_the_auth_secret(pg_dsn: str, browser, crashed_and_resumed) -> None:
    _, run = crashed_and_resumed
    for base in start_ui(pg_dsn, DURABLE_AUTH_SECRET="team-secret"):
        refused = requests.get(base, timeout=10)  # a browser would ask; Chromium headless just fails the load
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Basic")
        assert requests.get(base, auth=("me", "wrong"), timeout=10).status_code == 401
        allowed = browser.new_context(http_credentials={"username": "me", "password": "team-secret"}).new_page()
        assert allowed.goto(f"{base}/?prefix={run}").status == 200
        assert allowed.locator("#runs tr", has_text=run).count() == 1


ATTACK = """<form id="f" method="POST" action="{ui}/runs/{run}/delete">
<input name="_xsrf" value="deadbeef"><input name="confirm" value="yes"></form>
<script>document.cookie = "_xsrf=deadbeef; path=/"; document.getElementById("f").submit();</script>"""


@pytest.fixture
def foreign_page() -> Iterator[Canned]:
    """Another local web server (a dev server, a notebook): it serves whatever page the test sets."""
    with canned_server("text/html") as server:
        yield server


def test_a_page_on_another_local_port_cannot_delete_a_run(
    ui: str, browser, crashed_and_resumed, pg_dsn: str, foreign_page: Canned
) -> None:
    """Cookie tossing: a page on another port of 127.0.0.1 sets the `_xsrf` cookie (cookies are not
    isolated by port) and posts a delete carrying the same value. The action token is bound to the
    UI's own secret and the request comes from a foreign origin: refused, the run stays."""
    _, run = crashed_and_resumed
    foreign_page.answers["/attack"] = (200, ATTACK.format(ui=ui, run=run).encode())
    page = browser.new_page()
    page.goto(f"{ui}/runs/{run}")  # the operator has the UI open
    page.goto(f"http://{foreign_page.address}/attack")
    page.wait_for_load_state("load")
    time.sleep(1)
    assert sql(pg_dsn, "SELECT count(*) FROM durable_runs WHERE id = %s", run) == [(1,)]


def test_a_rebound_dns_name_gets_nothing(pg_dsn: str, crashed_and_resumed) -> None:
    """DNS rebinding: a foreign name that resolves to 127.0.0.1 (here by Chromium's resolver rules)
    reaches the UI's port, but the UI answers only requests addressed to it."""
    from playwright.sync_api import sync_playwright

    _, run = crashed_and_resumed
    for base in start_ui(pg_dsn):
        port = base.rsplit(":", 1)[1]
        with sync_playwright() as p:
            chromium = p.chromium.launch(executable_path=CHROMIUM,
                                         args=["--no-sandbox", "--host-resolver-rules=MAP rebind.test 127.0.0.1"])
            try:
                page = chromium.new_page()
                answer = page.goto(f"http://rebind.test:{port}/runs/{run}")
                assert answer is not None and answer.status == 403 and run not in page.content()
                deleted = page.evaluate(
                    f"fetch('/runs/{run}/delete', {{method: 'POST', body: new URLSearchParams({{confirm: 'yes'}})}})"
                    ".then(r => r.status)")
                assert deleted == 403
            finally:
                chromium.close()
        assert requests.get(f"{base}/runs/{run}", timeout=10).status_code == 200  # its own address works
    assert sql(pg_dsn, "SELECT count(*) FROM durable_runs WHERE id = %s", run) == [(1,)]


PAYLOAD = "<script>window.pwned = 1</script><img src=x onerror='window.pwned = 2'>"


def test_journaled_markup_is_shown_as_text_never_run(ui: str, browser, sidecars: Sidecars, http_api: PaidApi) -> None:
    """A recorded request and answer carrying markup: the step page and the error page show it as
    text, and no script of it runs in the operator's browser (the page holds the action token)."""
    sidecar = sidecars.start()
    run = new_run()
    r = requests.post(f"{http_api.url}/v1/echo?note={PAYLOAD}", data=PAYLOAD.encode(),
                      proxies={"http": sidecar.proxy_url(run, "a1")}, timeout=30)
    assert r.headers["Durable-Outcome"] == "recorded"
    page = browser.new_page()
    page.goto(f"{ui}/runs/{run}/steps/1")
    assert PAYLOAD in page.inner_text("body")
    assert page.evaluate("window.pwned === undefined")
    page.goto(f"{ui}/runs/{PAYLOAD.replace('/', '%2F')}/steps/1")  # an error page naming the bad run id
    assert page.evaluate("window.pwned === undefined")


def test_actions_need_the_auth_secret_as_much_as_pages(pg_dsn: str, crashed_and_resumed) -> None:
    """With DURABLE_AUTH_SECRET set, an action with a valid action token but no credentials is refused
    and changes nothing (the token alone is not the secret)."""
    _, run = crashed_and_resumed
    for base in start_ui(pg_dsn, DURABLE_AUTH_SECRET="team-secret"):
        page = requests.get(f"{base}/runs/{run}", auth=("me", "team-secret"), timeout=10).text
        token = re.search(r'name="_xsrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
        r = requests.post(f"{base}/runs/{run}/delete", data={"_xsrf": token, "confirm": "yes"}, timeout=10)
        assert r.status_code == 401
    assert sql(pg_dsn, "SELECT count(*) FROM durable_runs WHERE id = %s", run) == [(1,)]


def test_a_step_page_shows_durations_and_doubt_as_people_read_them(ui: str, crashed_and_resumed, pg_dsn: str) -> None:
    """A duration to a tenth of a millisecond (not 196.32857799996373 ms); an in-doubt step says it was
    not answered (not `completed · 0 ms`); no page 404s on /favicon.ico."""
    _, run = crashed_and_resumed
    page = requests.get(f"{ui}/runs/{run}/steps/1", timeout=10).text
    assert re.search(r"completed [^<]*·\s+\d+\.\d ms", page) and not re.search(r"\d+\.\d{2,} ms", page)
    # the run page's column is the last attempt; the step page names both, never one for the other
    assert "recorded by attempt a1, last seen by attempt a2" in page
    assert "<th>last attempt</th>" in requests.get(f"{ui}/runs/{run}", timeout=10).text
    sql(pg_dsn, "UPDATE durable_steps SET state = 'pending', completed_at = NULL WHERE run_id = %s AND seq = 4 RETURNING seq", run)
    doubt = requests.get(f"{ui}/runs/{run}/steps/4", timeout=10).text
    assert "not answered (in doubt)" in doubt and "completed" not in doubt.split("not answered")[0][-80:]
    assert requests.get(f"{ui}/favicon.ico", timeout=10).status_code == 204


def test_the_live_view_sends_nothing_while_the_run_is_unchanged(
    ui: str, crashed_and_resumed, sidecars: Sidecars, http_api: PaidApi
) -> None:
    """The run page polls every second: while nothing changed the answer is a bodiless 204 (a long
    run's page is megabytes); a new step sends the steps again, with a new version."""
    sidecar, run = crashed_and_resumed
    page = requests.get(f"{ui}/runs/{run}", timeout=10).text
    version = re.search(r'data-version="([^"]*)"', page).group(1)  # type: ignore[union-attr]
    quiet = requests.get(f"{ui}/runs/{run}/live", params={"since": version}, timeout=10)
    assert quiet.status_code == 204 and quiet.content == b""
    assert chat(sidecar, http_api, run, "a2", 9) == "recorded"
    changed = requests.get(f"{ui}/runs/{run}/live", params={"since": version}, timeout=10)
    assert changed.status_code == 200 and changed.json()["version"] != version
    assert f"/runs/{run}/steps/5" in changed.json()["html"]
