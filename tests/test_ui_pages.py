"""`durable ui`'s pages and actions over HTTP, its server in this process and its journal real (a run
recorded by an in-process sidecar): what each page shows, what each action changes, and every
check an action must pass (Host, Origin, Sec-Fetch-Site, the action token, confirmation, the auth
secret). test_ui.py drives the same UI as a separate process in Chromium; these take seconds, so
scripts/mutate.sh runs them first."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import requests
from tornado.escape import xhtml_escape
from conftest import sql
from inprocess import answer, break_off, call, send, sidecar

from durable_sidecar.tools import launcher, ui

MARKUP = "<script>window.pwned=1</script>"
LEGEND = ("recorded", "replayed", "reissued", "diverged", "in-doubt", "failed", "forked", "edited", "imported")


def serve(dsn: str, secret: str | None = None) -> Iterator[str]:
    """The UI's app on a free port, served by a thread of its own until the test ends."""
    port = launcher.free_port()
    ready, loop_box = threading.Event(), []

    def run() -> None:
        async def main() -> None:
            stop = asyncio.Event()
            loop_box.append((asyncio.get_running_loop(), stop))
            server = ui.app(dsn, secret, ui.allowed_hosts("127.0.0.1", port, ["ui.example:8443"])).listen(
                port, "127.0.0.1"
            )
            ready.set()
            await stop.wait()
            server.stop()

        asyncio.run(main())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop, stop = loop_box[0]
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)


@pytest.fixture
def base(pg_dsn: str) -> Iterator[str]:
    yield from serve(pg_dsn)


@pytest.fixture
def web() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.trust_env = False  # straight to the UI, whatever proxy the environment names
        yield session


@pytest.fixture
def run(pg_dsn: str) -> str:
    """A run of three steps: 1 completed (its answer carries markup), 2 failed (a 503), 3 in doubt."""
    run = f"ui-{uuid.uuid4().hex[:12]}"

    async def record() -> None:
        async with sidecar(pg_dsn) as addon:
            paid = call(run, "a1", body=b'{"amount": 5}')
            await send(addon, paid)
            await answer(addon, paid, body=json.dumps({"charged": 5, "note": MARKUP}).encode())
            busy = call(run, "a1", body=b'{"amount": 6}')
            await send(addon, busy)
            await answer(addon, busy, status=503, body=b"busy")
            cut = call(run, "a1", body=b'{"amount": 7}')
            await send(addon, cut)
            await break_off(addon, cut, connected=True)

    asyncio.run(record())
    return run


def token(page: str) -> str:
    found = re.search(r'name="_xsrf" value="([^"]+)"', page)
    assert found, "the page carries the action token"
    return found.group(1)


def test_the_pages_show_runs_steps_and_answers_escaped(base: str, web: requests.Session, run: str) -> None:
    listing = web.get(f"{base}/", timeout=10)
    assert listing.status_code == 200 and f'<a href="/runs/{run}">{run}</a>' in listing.text
    assert "<title>runs · durable</title>" in listing.text
    assert run in web.get(f"{base}/", params={"prefix": run[:10]}, timeout=10).text
    assert run not in web.get(f"{base}/", params={"prefix": "nothing-"}, timeout=10).text
    assert run in web.get(f"{base}/", params={"prefix": run, "state": "in doubt"}, timeout=10).text
    assert "no run matches" in web.get(f"{base}/", params={"prefix": run, "state": "ok"}, timeout=10).text

    page = web.get(f"{base}/runs/{run}", timeout=10).text
    assert all(word in page for word in ("recorded", "failed", "in-doubt")) and token(page)
    assert f"<title>run {run} · durable</title>" in page
    version = web.get(f"{base}/runs/{run}/live", timeout=10).json()["version"]
    assert f'<div id="live" data-version="{version}"><svg id="timeline" width="960"' in page  # polls from here
    assert all(f'<a href="/runs/{run}/steps/{n}">{n}</a>' in page for n in (1, 2, 3))
    legend = "".join(f'<span class="{o}">{o}</span>' for o in LEGEND)
    assert f'<p class="legend">{legend}</p>' in page  # every outcome a step can show, with its colour
    step = web.get(f"{base}/runs/{run}/steps/1", timeout=10).text
    assert "&quot;amount&quot;: 5" in step  # JSON shown pretty-printed
    assert MARKUP not in step and "&lt;script&gt;window.pwned=1&lt;/script&gt;" in step
    doubt = web.get(f"{base}/runs/{run}/steps/3", timeout=10).text
    assert "not answered (in doubt)" in doubt

    missing = web.get(f"{base}/runs/{ui.url(MARKUP)}/steps/1", timeout=10)
    assert missing.status_code == 404 and MARKUP not in missing.text and "&lt;script&gt;" in missing.text
    assert web.get(f"{base}/favicon.ico", timeout=10).status_code == 204


def test_runs_are_listed_a_page_at_a_time(base: str, web: requests.Session, pg_dsn: str) -> None:
    prefix = f"paged-{uuid.uuid4().hex[:8]}-"
    for n in range(51):  # fifty runs a page
        sql(pg_dsn, "INSERT INTO durable_runs (id) VALUES (%s)", f"{prefix}{n:03}")
    first = web.get(f"{base}/", params={"prefix": prefix}, timeout=10).text
    assert first.count(f'<a href="/runs/{prefix}') == 50
    assert f'<a rel="next" href="/?prefix={prefix}&amp;state=&amp;page=1">older</a>' in first
    assert 'rel="prev"' not in first
    second = web.get(f"{base}/", params={"prefix": prefix, "page": "1"}, timeout=10).text
    assert second.count(f'<a href="/runs/{prefix}') == 1 and 'rel="next"' not in second
    assert f'<a rel="prev" href="/?prefix={prefix}&amp;state=&amp;page=0">newer</a>' in second
    for page in ("-3", ""):  # out of range or empty: the first page
        assert web.get(f"{base}/", params={"prefix": prefix, "page": page}, timeout=10).text == first
    sql(pg_dsn, "DELETE FROM durable_runs WHERE id = %s", f"{prefix}050")
    exactly = web.get(f"{base}/", params={"prefix": prefix}, timeout=10).text  # fifty runs: one page
    assert exactly.count(f'<a href="/runs/{prefix}') == 50 and 'rel="next"' not in exactly


def test_the_live_view_answers_only_when_the_run_changed(
    base: str, web: requests.Session, run: str, pg_dsn: str
) -> None:
    live = web.get(f"{base}/runs/{run}/live", timeout=10)
    assert live.status_code == 200 and live.headers["Cache-Control"] == "no-store"
    version = live.json()["version"]
    assert "in-doubt" in live.json()["html"]
    unchanged = web.get(f"{base}/runs/{run}/live", params={"since": version}, timeout=10)
    assert unchanged.status_code == 204 and unchanged.content == b""
    sql(pg_dsn, "UPDATE durable_steps SET state = 'completed', status = 200 WHERE run_id = %s AND seq = 3", run)
    sql(pg_dsn, "UPDATE durable_runs SET updated_at = now() + interval '1 second' WHERE id = %s", run)
    changed = web.get(f"{base}/runs/{run}/live", params={"since": version}, timeout=10)
    assert changed.status_code == 200 and changed.json()["version"] != version


def test_each_action_changes_the_journal_as_the_cli_would(
    base: str, web: requests.Session, run: str, pg_dsn: str
) -> None:
    form = {"_xsrf": token(web.get(f"{base}/runs/{run}", timeout=10).text), "confirm": "yes"}
    fork = f"{run}-fork"
    r = web.post(f"{base}/runs/{run}/fork", data={**form, "at": "1", "to": fork}, allow_redirects=False, timeout=10)
    assert r.status_code == 302 and r.headers["Location"] == f"/runs/{fork}"
    assert sql(pg_dsn, "SELECT forked_from FROM durable_runs WHERE id = %s", fork) == [(run,)]
    assert sql(pg_dsn, "SELECT count(*) FROM durable_steps WHERE run_id = %s", fork) == [(1,)]

    original = web.post(f"{base}/runs/{run}/steps/1/edit", data={**form, "body": "x"}, timeout=10)
    assert original.status_code == 400 and "is not a fork" in original.text  # only a fork's answers change
    r = web.post(
        f"{base}/runs/{fork}/steps/1/edit",
        data={**form, "status": "201", "body": "edited"},
        allow_redirects=False,
        timeout=10,
    )
    assert r.status_code == 302 and r.headers["Location"] == f"/runs/{fork}/steps/1"
    assert sql(pg_dsn, "SELECT status, response_body FROM durable_steps WHERE run_id = %s AND seq = 1", fork) == [
        (201, b"edited")
    ]
    web.post(f"{base}/runs/{fork}/steps/1/edit", data={**form, "status": "", "body": "again"}, timeout=10)
    assert sql(pg_dsn, "SELECT status, response_body FROM durable_steps WHERE run_id = %s AND seq = 1", fork) == [
        (201, b"again")  # no status given: it keeps the one it had
    ]
    web.post(f"{base}/runs/{fork}/steps/1/edit", data={**form, "status": "202"}, timeout=10)
    assert sql(pg_dsn, "SELECT status, response_body FROM durable_steps WHERE run_id = %s AND seq = 1", fork) == [
        (202, b"again")  # no body given: it keeps the one it had
    ]
    fork_step = web.get(f"{base}/runs/{fork}/steps/1", timeout=10).text
    assert f"<title>run {fork} · step 1 · durable</title>" in fork_step
    assert "copied here by <code>durable fork</code>" in fork_step and "attempt fork" not in fork_step
    assert "a fork does not copy the original run's keys" in fork_step
    assert f'action="/runs/{fork}/steps/1/edit"' in fork_step  # a fork's answers can be edited...
    assert f'action="/runs/{run}/steps/1/edit"' not in web.get(f"{base}/runs/{run}/steps/1", timeout=10).text
    answer = "SELECT status, response_headers, response_body FROM durable_steps WHERE run_id = %s AND seq = 1"
    web.post(f"{base}/runs/{fork}/steps/1/resolve", data={**form, "how": "complete"}, timeout=10)
    assert sql(pg_dsn, answer, fork) == [(200, [["Content-Type", "application/json"], ["Content-Length", "0"]], b"")]
    web.post(f"{base}/runs/{fork}/steps/1/resolve",
             data={**form, "how": "complete", "body": "hi", "content_type": "text/plain"}, timeout=10)
    assert sql(pg_dsn, answer, fork) == [(200, [["Content-Type", "text/plain"], ["Content-Length", "2"]], b"hi")]
    r = web.post(f"{base}/runs/{run}/steps/2/resolve", data={**form, "how": "reissue"}, allow_redirects=False, timeout=10)
    assert r.status_code == 302 and r.headers["Location"] == f"/runs/{run}/steps/2"
    assert sql(pg_dsn, "SELECT approved FROM durable_steps WHERE run_id = %s AND seq = 2", run) == [(True,)]
    r = web.post(
        f"{base}/runs/{run}/steps/3/resolve",
        data={**form, "how": "complete", "status": "202", "body": '{"done": 1}'},
        allow_redirects=False,
        timeout=10,
    )
    assert r.status_code == 302 and r.headers["Location"] == f"/runs/{run}/steps/3"
    assert sql(pg_dsn, "SELECT state, status, response_body FROM durable_steps WHERE run_id = %s AND seq = 3", run) == [
        ("completed", 202, b'{"done": 1}')
    ]
    sql(pg_dsn, "UPDATE durable_steps SET state = 'pending' WHERE run_id = %s AND seq = 2", run)
    r = web.post(
        f"{base}/runs/{run}/steps/2/resolve", data={**form, "how": "forget"}, allow_redirects=False, timeout=10
    )
    assert r.status_code == 302 and r.headers["Location"] == f"/runs/{run}"
    assert sql(pg_dsn, "SELECT seq FROM durable_steps WHERE run_id = %s ORDER BY seq", run) == [(1,), (3,)]

    har = web.get(f"{base}/runs/{run}/export.har", timeout=10)
    assert har.headers["Content-Type"] == "application/json"
    assert har.headers["Content-Disposition"] == f'attachment; filename="{run}.har"'
    assert len(har.json()["log"]["entries"]) == 2
    flows = web.get(f"{base}/runs/{run}/export.flows", timeout=10)
    assert flows.headers["Content-Type"] == "application/octet-stream" and flows.content

    r = web.post(f"{base}/runs/{run}/delete", data=form, allow_redirects=False, timeout=10)
    assert r.status_code == 302 and r.headers["Location"] == "/"
    assert sql(pg_dsn, "SELECT count(*) FROM durable_runs WHERE id = %s", run) == [(0,)]


def test_an_action_that_fails_a_check_changes_nothing(base: str, web: requests.Session, run: str, pg_dsn: str) -> None:
    action = f"{base}/runs/{run}/delete"
    good = {"_xsrf": token(web.get(f"{base}/runs/{run}", timeout=10).text), "confirm": "yes"}
    port = base.rsplit(":", 1)[1]
    no_token, unconfirmed, not_own = (
        "the action token is missing or wrong: reload the page",
        "not confirmed: tick the confirm box",
        "actions are taken only from the UI's own pages",
    )
    host = f"this UI answers only 127.0.0.1:{port}, localhost:{port}, ui.example:8443"
    refused = [
        (web.post(action, data={"confirm": "yes"}, timeout=10), 403, no_token),
        (web.post(action, data={**good, "_xsrf": good["_xsrf"][:-1] + "x"}, timeout=10), 403, no_token),
        (web.post(action, data={"_xsrf": good["_xsrf"]}, timeout=10), 400, unconfirmed),
        (web.post(action, data=good, headers={"Origin": "http://127.0.0.1:9999"}, timeout=10), 403, not_own),
        (web.post(action, data=good, headers={"Sec-Fetch-Site": "cross-site"}, timeout=10), 403, not_own),
        (web.post(action, data=good, headers={"Sec-Fetch-Site": "same-site"}, timeout=10), 403, not_own),
        (web.post(action, data=good, headers={"Host": "evil.example:" + port}, timeout=10), 403, host),
        (web.get(f"{base}/runs/{run}", headers={"Host": "evil.example"}, timeout=10), 403, host),
        (web.post(f"{base}/runs/{run}/fork", data={**good, "at": "1", "to": "bad id!"}, timeout=10), 400,
         "invalid run id 'bad id!': use 1-128 characters of A-Z a-z 0-9 . _ : @ -"),
        (web.post(f"{base}/runs/{run}/steps/3/resolve", data={**good, "how": "guess"}, timeout=10), 400,
         "resolve how? 'guess'"),
    ]
    for response, status, why in refused:  # the error page names the status and says why, escaped
        page = f"<title>{status} · durable</title>", f"<h1>{status}</h1><p>{xhtml_escape(why)}</p>"
        assert response.status_code == status and all(part in response.text for part in page), response.text
    assert sql(pg_dsn, "SELECT count(*) FROM durable_runs WHERE id = %s", run) == [(1,)]
    assert sql(pg_dsn, "SELECT count(*) FROM durable_runs WHERE id LIKE %s", run + "%") == [(1,)]
    # the UI's own origin and names it was given are let in; so is a browser's direct navigation
    for headers in (
        {"Origin": base},
        {"Origin": "http://localhost:" + port, "Host": "localhost:" + port},
        {"Sec-Fetch-Site": "none"},
        {"Host": "UI.example:8443", "Origin": "http://ui.example:8443"},
    ):
        assert web.get(f"{base}/runs/{run}", headers=headers, timeout=10).status_code == 200, headers
    # pages are read from anywhere (a link in a chat, a bookmark): only actions are checked
    for headers in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        assert web.get(f"{base}/runs/{run}", headers=headers, timeout=10).status_code == 200, headers
        assert web.head(f"{base}/runs/{run}", headers=headers, timeout=10).status_code == 405, headers
    by_header = web.post(f"{base}/runs/{run}/steps/1/edit", data={"confirm": "yes", "body": "x"},
                         headers={"X-Xsrftoken": good["_xsrf"]}, timeout=10)
    assert by_header.status_code == 400 and "is not a fork" in by_header.text  # the token in a header counts
    typed = web.post(f"{base}/runs/{run}/steps/1/edit", data={**good, "body": "x"},
                     headers={"Sec-Fetch-Site": "none"}, timeout=10)
    assert typed.status_code == 400 and "is not a fork" in typed.text  # the user's own navigation counts
    kept = web.post(
        action, data=good, headers={"Origin": base, "Sec-Fetch-Site": "same-origin"}, allow_redirects=False, timeout=10
    )
    assert kept.status_code == 302


def test_with_a_secret_every_page_and_action_asks_for_it(pg_dsn: str, run: str) -> None:
    """Issue 28, bug 2: an action with a valid action token but no credentials changes nothing."""
    for base in serve(pg_dsn, secret="team-secret"):
        with requests.Session() as web:
            web.trust_env = False
            bare = web.get(f"{base}/runs/{run}", timeout=10)
            assert bare.status_code == 401 and bare.headers["WWW-Authenticate"].startswith("Basic realm=")
            assert bare.text == "the durable ui asks for DURABLE_AUTH_SECRET as the password"
            assert web.get(f"{base}/", auth=("me", "wrong"), timeout=10).status_code == 401
            garbled = {"Authorization": "Basic " + base64.b64encode(b"\xff\xfe:team-secret").decode()}
            assert web.get(f"{base}/", headers=garbled, timeout=10).status_code == 401
            assert web.get(f"{base}/", headers={"Authorization": "Basic !!!"}, timeout=10).status_code == 401
            assert web.get(f"{base}/", headers={"Authorization": "Bearer team-secret"}, timeout=10).status_code == 401
            page = web.get(f"{base}/runs/{run}", auth=("anyone", "team-secret"), timeout=10)
            assert page.status_code == 200
            form = {"_xsrf": token(page.text), "confirm": "yes"}
            assert web.post(f"{base}/runs/{run}/delete", data=form, timeout=10).status_code == 401
            assert sql(pg_dsn, "SELECT count(*) FROM durable_runs WHERE id = %s", run) == [(1,)]
            done = web.post(
                f"{base}/runs/{run}/delete", data=form, auth=("x", "team-secret"), allow_redirects=False, timeout=10
            )
            assert done.status_code == 302
    assert sql(pg_dsn, "SELECT count(*) FROM durable_runs WHERE id = %s", run) == [(0,)]


def test_allowed_hosts_are_the_address_its_loopback_names_and_those_given() -> None:
    assert ui.allowed_hosts("127.0.0.1", 8080, []) == {"127.0.0.1:8080", "localhost:8080"}
    assert ui.allowed_hosts("::1", 80, []) == {"[::1]:80", "localhost:80", "127.0.0.1:80"}
    assert ui.allowed_hosts("localhost", 80, []) == {"localhost:80", "127.0.0.1:80"}
    assert ui.allowed_hosts("10.0.0.5", 8080, ["Durable.Example", "proxy.example:443"]) == {
        "10.0.0.5:8080",
        "durable.example:8080",
        "proxy.example:443",
    }


def test_bodies_streams_outcomes_and_the_timeline_as_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ui.shown(b'{"a":[1,"\xc3\xa9"]}') == '{\n  "a": [\n    1,\n    "\xe9"\n  ]\n}'
    assert ui.shown(b"plain \xff") == "plain \ufffd" and ui.shown(None) == "" and ui.shown(b"") == ""
    sse = (
        b'event: delta\r\ndata: {"t":1}\r\n\r\ndata: one\ndata: two\n\n: comment\n\n'
        b"event:ping\ndata:[1,2]\n\ndata: caf\xc3\xa9 \xff\n\n"
    )
    assert ui.events(sse, [("Content-Type", "text/event-stream; charset=utf-8")]) == [
        ("delta", '{\n  "t": 1\n}'),
        ("message", "one\ntwo"),
        ("message", ""),
        ("ping", "[\n  1,\n  2\n]"),  # no space after the colon; a JSON array pretty-printed too
        ("message", "caf\xe9 \ufffd"),  # bytes that are not UTF-8 shown replaced
    ]
    assert ui.events(sse, [("content-type", "application/json")]) == [] and ui.events(None, None) == []
    assert [
        ui.outcome(s)
        for s in (
            {"state": "pending", "last_outcome": "recorded"},
            {"state": "failed", "last_outcome": "recorded"},
            {"state": "completed", "last_outcome": "replayed"},
            {"state": "completed", "last_outcome": None},
        )
    ] == ["in-doubt", "failed", "replayed", "recorded"]
    assert ui.when(None) == "" and ui.url("a/b c") == "a%2Fb%20c"
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        assert ui.when(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2026-01-02 03:04:05"
    finally:
        monkeypatch.undo()
        time.tzset()
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    steps = [
        {
            "seq": 1,
            "state": "completed",
            "last_outcome": None,
            "started_at": t0,
            "completed_at": t0 + timedelta(seconds=1),
        },
        {
            "seq": 2,
            "state": "pending",
            "last_outcome": None,
            "started_at": t0 + timedelta(seconds=1),
            "completed_at": None,
        },
        {
            "seq": 3,
            "state": "completed",
            "last_outcome": None,
            "started_at": t0 + timedelta(seconds=2),
            "completed_at": t0 + timedelta(seconds=4),
        },
    ]
    bars, span = ui.timeline(steps, width=400)
    assert span == 4.0
    assert [(b["seq"], b["row"], b["x"], b["w"], b["outcome"]) for b in bars] == [
        (1, 0, 0.0, 100.0, "recorded"),
        (2, 1, 100.0, 2.0, "in-doubt"),
        (3, 2, 200.0, 200.0, "recorded"),
    ]
    assert ui.timeline([]) == ([], 0.0)
    assert [b["x"] for b in ui.timeline(steps)[0]] == [0.0, 225.0, 450.0]  # 900 px wide unless told
    thirds = [dict(steps[0], completed_at=t0 + timedelta(seconds=3)), dict(steps[1], completed_at=None)]
    assert [(b["x"], b["w"]) for b in ui.timeline(thirds, width=400)[0]] == [(0.0, 400.0), (133.3, 2.0)]
    lone = [dict(steps[0], completed_at=t0)]
    assert ui.timeline(lone) == ([{"seq": 1, "row": 0, "x": 0.0, "w": 2.0, "outcome": "recorded"}], 0.001)
    seventh = [dict(steps[0], completed_at=t0 + timedelta(seconds=7)),
               dict(steps[1], started_at=t0, completed_at=t0 + timedelta(seconds=1))]
    assert ui.timeline(seventh, width=100)[0][1]["w"] == 14.3  # widths to a tenth of a pixel
    assert len(ui.timeline(steps * 200)[0]) == 400  # a very long run: its first 400 steps are drawn
