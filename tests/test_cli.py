"""The `durable` CLI against a real database filled by real runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from mitmproxy import io as mitmio

from conftest import DEMO_AGENT, PaidApi, Sidecars, env_without_proxy, new_run, on_a_terminal, run_agent, runs_around_cutoff, sql, terminal_output

DURABLE = str(Path(sys.executable).with_name("durable"))
STEPS = 4
CALLS = STEPS * 3


def durable(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run([DURABLE, *args], capture_output=True, text=True, timeout=120, env=env)
    if check and out.returncode != 0:
        raise AssertionError(f"durable {' '.join(args)} failed ({out.returncode}): {out.stderr}")
    return out


def agent_run(run: str, api: PaidApi, dsn: str, confdir: Path, *agent_args: str) -> subprocess.CompletedProcess:
    """`durable run` wrapping the unmodified agent: no proxy or CA variable set by hand."""
    env = env_without_proxy()
    return durable("run", "--run", run, "--dsn", dsn, "--confdir", str(confdir), "--set", "ssl_insecure=true",
                   "--", sys.executable, str(DEMO_AGENT), "--api", api.url, "--steps", str(STEPS), "--json",
                   *agent_args, check=False, env=env)


def outcomes(out: subprocess.CompletedProcess) -> list[str]:
    return [json.loads(line)["outcome"] for line in out.stdout.splitlines() if line.startswith("{")]


def test_durable_run_survives_a_crash_and_show_agrees_with_the_books(
    https_api: PaidApi, pg_dsn: str, confdir: Path
) -> None:
    run = new_run()
    first = agent_run(run, https_api, pg_dsn, confdir, "--crash-after", "5")
    assert first.returncode == 137  # the agent's own SIGKILL, passed on
    assert outcomes(first) == ["recorded"] * 5
    assert "5 recorded, 0 replayed" in first.stderr

    second = agent_run(run, https_api, pg_dsn, confdir)
    assert second.returncode == 0, second.stderr
    assert outcomes(second) == ["replayed"] * 5 + ["recorded"] * (CALLS - 5)
    assert f"{CALLS - 5} recorded, 5 replayed, 0 reissued, 0 diverged" in second.stderr
    books = https_api.books()
    assert books["charges"] == CALLS
    shown = json.loads(durable("show", run, "--dsn", pg_dsn, "--json").stdout)
    saved = sum(s["tokens"] for s in shown["steps"][:5])
    assert saved > 20  # the plain completion (20) and the streamed one's final usage
    assert f"replay saved 5 upstream calls and {saved} LLM tokens" in second.stderr
    assert [s["seq"] for s in shown["steps"]] == list(range(1, CALLS + 1))
    assert all(s["state"] == "completed" and s["status"] in (200, 201) for s in shown["steps"])
    assert [s["method"] for s in shown["steps"]] == [r["method"] for r in books["requests"]]
    assert [urlsplit(s["url"]).path for s in shown["steps"]] == [urlsplit(r["path"]).path for r in books["requests"]]
    table = durable("show", run, "--dsn", pg_dsn, env={**os.environ, "COLUMNS": "200"}).stdout
    assert "completed" in table and "/v1/payments" in table
    narrow = durable("show", run, "--dsn", pg_dsn, env={**os.environ, "COLUMNS": "80"}).stdout
    assert max(map(len, narrow.splitlines())) <= 80 and narrow.count("completed") == CALLS  # fits, nothing cut
    listed = durable("runs", "--dsn", pg_dsn, env={**os.environ, "COLUMNS": "200"}).stdout
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", listed) and "+00:00" not in listed  # to the second


def test_fork_replays_the_first_steps_then_goes_live(
    sidecars: Sidecars, ca_bundle: Path, https_api: PaidApi, pg_dsn: str
) -> None:
    run, forked = new_run(), new_run()
    sidecar = sidecars.start()
    run_agent(sidecar, ca_bundle, https_api, run, "a1", steps=STEPS)
    assert "with its first 4 steps" in durable("fork", run, "--at", "4", "--to", forked, "--dsn", pg_dsn).stdout
    _, calls = run_agent(sidecar, ca_bundle, https_api, forked, "f1", steps=STEPS)
    assert [c["outcome"] for c in calls] == ["replayed"] * 4 + ["recorded"] * (CALLS - 4)
    assert https_api.books()["charges"] == CALLS + CALLS - 4
    runs = json.loads(durable("runs", "--dsn", pg_dsn, "--json").stdout)
    assert {r["run"]: r["forked_from"] for r in runs}[forked] == run


def test_edit_a_forked_step_and_replay_it(sidecars: Sidecars, http_api: PaidApi, pg_dsn: str, tmp_path: Path) -> None:
    import requests

    run, forked = new_run(), new_run()
    sidecar = sidecars.start()
    session = requests.Session()
    session.trust_env = False
    url = f"{http_api.url}/v1/search?q=edit"
    session.get(url, proxies={"http": sidecar.proxy_url(run, "a1")})
    refused = durable("edit", run, "1", "--status", "500", "--dsn", pg_dsn, check=False)
    assert refused.returncode == 1 and "not a fork" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    durable("fork", run, "--at", "1", "--to", forked, "--dsn", pg_dsn)
    (tmp_path / "body.json").write_text('{"results": ["an answer the agent never got"]}')
    durable("edit", forked, "1", "--status", "203", "--body-file", str(tmp_path / "body.json"), "--dsn", pg_dsn)
    r = session.get(url, proxies={"http": sidecar.proxy_url(forked, "f1")})
    assert r.status_code == 203 and r.json() == {"results": ["an answer the agent never got"]}
    original = session.get(url, proxies={"http": sidecar.proxy_url(run, "a2")})
    assert original.status_code == 200 and original.json()["call"] == 1
    assert http_api.books()["calls"] == 1


def test_export_har_and_flows_then_import_and_replay_without_upstream(
    sidecars: Sidecars, ca_bundle: Path, https_api: PaidApi, pg_dsn: str, tmp_path: Path
) -> None:
    run, imported = new_run(), new_run()
    sidecar = sidecars.start()
    _, first = run_agent(sidecar, ca_bundle, https_api, run, "a1", steps=2)
    run_agent(sidecar, ca_bundle, https_api, run, "a2", steps=1)  # replays 3 steps: marked in the flows

    har_path, flows_path = tmp_path / "run.har", tmp_path / "run.flows"
    durable("export", run, "--har", str(har_path), "--dsn", pg_dsn)
    durable("export", run, "--flows", str(flows_path), "--dsn", pg_dsn)
    har = json.loads(har_path.read_text())
    assert har["log"]["version"] == "1.2" and har["log"]["creator"]["name"]
    entries = har["log"]["entries"]
    assert len(entries) == 6
    for entry in entries:
        assert {"startedDateTime", "time", "request", "response", "cache", "timings"} <= set(entry)
        assert {"method", "url", "httpVersion", "headers", "queryString", "cookies", "headersSize", "bodySize"} <= set(entry["request"])
        assert {"status", "statusText", "httpVersion", "headers", "cookies", "content", "redirectURL",
                "headersSize", "bodySize"} <= set(entry["response"])
        assert {"size", "mimeType"} <= set(entry["response"]["content"])
        assert not [h for h in entry["request"]["headers"] if h["value"] == "Bearer sk-demo-not-a-real-key"]
    with open(flows_path, "rb") as f:
        flows = list(mitmio.FlowReader(f).stream())
    assert len(flows) == 6 and sum(1 for fl in flows if fl.marked) == 3
    assert flows[0].response.status_code == 200 and "step 1" in flows[0].comment

    durable("import", str(har_path), "--run", imported, "--dsn", pg_dsn)
    https_api.stop()  # from here on nothing upstream: the imported run must replay everything
    try:
        _, replayed = run_agent(sidecar, ca_bundle, https_api, imported, "ci", steps=2)
    finally:
        https_api.start()
    assert [c["outcome"] for c in replayed] == ["replayed"] * 6
    assert [c["result"] for c in replayed] == [c["result"] for c in first]


def test_resolve_in_doubt_steps(sidecars: Sidecars, http_api: PaidApi, pg_dsn: str, tmp_path: Path) -> None:
    import requests

    def pay(sidecar, run, attempt):
        return requests.post(f"{http_api.url}/v1/payments", json={"amount": 8},
                             proxies={"http": sidecar.proxy_url(run, attempt)}, timeout=30)

    runs = {name: new_run() for name in ("reissue", "forget", "complete")}
    for run in runs.values():  # each payment journaled as pending, then its sidecar dies before sending it
        doomed = sidecars.start(env={**os.environ, "DURABLE_FAULT": "after-pending-commit"})
        with pytest.raises(requests.ConnectionError):
            pay(doomed, run, "a1")
    strict = sidecars.start(durable_in_doubt="fail")
    assert pay(strict, runs["reissue"], "a2").status_code == 409

    durable("resolve", runs["reissue"], "1", "--reissue", "--dsn", pg_dsn)
    r = pay(strict, runs["reissue"], "a3")
    assert r.status_code == 201 and r.headers["Durable-Outcome"] == "reissued"

    assert "forgotten" in durable("resolve", runs["forget"], "1", "--forget", "--dsn", pg_dsn).stdout
    r = pay(strict, runs["forget"], "a2")
    assert r.headers["Durable-Outcome"] == "recorded"

    (tmp_path / "answer.json").write_text('{"payment_id": "pay_by_hand"}')
    durable("resolve", runs["complete"], "1", "--complete-from", str(tmp_path / "answer.json"), "--status", "201", "--dsn", pg_dsn)
    r = pay(strict, runs["complete"], "a2")
    assert r.headers["Durable-Outcome"] == "replayed" and r.json() == {"payment_id": "pay_by_hand"}
    assert http_api.books()["charges"] == 2  # the reissued one and the forgotten one, once each


def answer_on_a_terminal(answer: str, *args: str) -> str:
    """Run `durable ARGS` on a pseudo-terminal, type `answer` at its question; everything it wrote."""
    proc, fd = on_a_terminal([DURABLE, *args])
    output = b""
    while b"[y/N]" not in output:
        output += os.read(fd, 4096)
    os.write(fd, answer.encode() + b"\n")
    return (output + terminal_output(proc, fd)).decode(errors="replace")


def test_gc_rm_and_one_line_errors(sidecars: Sidecars, http_api: PaidApi, pg_dsn: str) -> None:
    runs = runs_around_cutoff(sidecars.start(), http_api, pg_dsn, cutoff_days=7)
    old, fresh = runs["old"], runs["fresh"]
    planned = json.loads(durable("gc", "--older-than", "7d", "--dry-run", "--json", "--dsn", pg_dsn).stdout)
    assert old in planned["would_delete"] and not {runs["inside"], runs["replayed"], fresh} & set(planned["would_delete"])
    assert sql(pg_dsn, "SELECT count(*) FROM durable_runs WHERE id = %s", old) == [(1,)]
    for age, says in (("7", "give a number and a unit"), ("0d", "must be more than 0")):
        refused = durable("gc", "--older-than", age, "--yes", "--dsn", pg_dsn, check=False)
        assert refused.returncode == 1 and says in refused.stderr
    unconfirmed = durable("gc", "--older-than", "7d", "--dsn", pg_dsn, check=False)  # no terminal, no --yes
    assert unconfirmed.returncode == 1 and "pass --yes" in unconfirmed.stderr
    assert sql(pg_dsn, "SELECT count(*) FROM durable_runs WHERE id = ANY(%s)", [old, fresh]) == [(2,)]
    answer_on_a_terminal("n", "gc", "--older-than", "7d", "--dsn", pg_dsn)
    assert sql(pg_dsn, "SELECT count(*) FROM durable_runs WHERE id = ANY(%s)", [old, fresh]) == [(2,)]
    assert "deleted 1 runs" in answer_on_a_terminal("y", "gc", "--older-than", "7d", "--dsn", pg_dsn)
    assert sql(pg_dsn, "SELECT count(*) FROM durable_runs WHERE id = ANY(%s)", [old, fresh]) == [(1,)]
    assert sql(pg_dsn, "SELECT count(*) FROM durable_runs WHERE id = ANY(%s)", list(runs.values())) == [(3,)]

    assert "1 steps" in durable("rm", fresh, "--dsn", pg_dsn).stdout
    missing = durable("show", fresh, "--dsn", pg_dsn, check=False)
    assert missing.returncode == 1 and missing.stderr.strip() == f"durable show: no run '{fresh}' in the journal"


def test_explain_matches_the_journaled_fingerprint(sidecars: Sidecars, http_api: PaidApi, pg_dsn: str, tmp_path: Path) -> None:
    sidecar = sidecars.start()
    run = new_run()
    url = f"{http_api.url}/v1/chat/completions?b=2&a=1"
    subprocess.run(["curl", "-s", "-x", sidecar.proxy_url(run, "a1"), "-H", "Content-Type: application/json",
                    "-d", '{"model": "m", "messages": []}', url], check=True, capture_output=True)
    (journaled,), = sql(pg_dsn, "SELECT fingerprint FROM durable_steps WHERE run_id = %s", run)
    explained = json.loads(durable("explain", "--json", "--", "curl", "-H", "content-type: application/json",
                                   "--data-raw", '{"messages":[],"model":"m"}', url.replace("b=2&a=1", "a=1&b=2")).stdout)
    assert explained["fingerprint"] == journaled
    assert explained["envelope"]["query"] == [["a", "1"], ["b", "2"]]
    har = tmp_path / "one.har"
    durable("export", run, "--har", str(har), "--dsn", pg_dsn)
    assert json.loads(durable("explain", "--har", str(har), "--entry", "1", "--json").stdout)["fingerprint"] == journaled
    assert f"fingerprint: {journaled}" in durable("explain", "--har", str(har)).stdout  # counts from 1, like seq
    zero = durable("explain", "--har", str(har), "--entry", "0", check=False)
    assert zero.returncode == 1 and "has entries 1..1" in zero.stderr


def test_diff_shows_where_an_attempt_diverged(sidecars: Sidecars, http_api: PaidApi, pg_dsn: str) -> None:
    import requests

    sidecar = sidecars.start()
    run = new_run()
    url = f"{http_api.url}/v1/chat/completions"
    for attempt, when in (("a1", "10:00"), ("a2", "10:05")):
        requests.post(url, json={"model": "m", "messages": [{"role": "user", "content": f"at {when}"}]},
                      proxies={"http": sidecar.proxy_url(run, attempt)}, timeout=30)
    rows = json.loads(durable("diff", run, "--json", "--dsn", pg_dsn).stdout)
    assert rows[0]["seq"] == 2 and rows[0]["attempt"] == "a2" and rows[0]["expected_step"] == 1
    assert rows[0]["diff"] == [{"field": "body/messages/0/content", "journaled": "at 10:00", "now": "at 10:05"}]
    assert '"at 10:00" -> "at 10:05"' in durable("diff", run, "--dsn", pg_dsn).stdout


def test_ca_path_bundle_and_install_dry_run(tmp_path: Path) -> None:
    confdir = tmp_path / "certs"
    path = Path(durable("ca", "path", "--confdir", str(confdir)).stdout.strip())
    assert path == confdir / "mitmproxy-ca-cert.pem" and path.read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert oct((confdir / "mitmproxy-ca.pem").stat().st_mode & 0o777) == "0o600"
    bundle = Path(durable("ca", "bundle", str(tmp_path / "b.pem"), "--confdir", str(confdir)).stdout.strip())
    assert path.read_text() in bundle.read_text() and bundle.read_text().count("BEGIN CERTIFICATE") > 1
    dry = durable("ca", "install", "--dry-run", "--confdir", str(confdir)).stdout
    assert "would run:" in dry and ("update-ca-certificates" in dry or "add-trusted-cert" in dry)


def test_durable_run_wraps_a_curl_agent(https_api: PaidApi, pg_dsn: str, confdir: Path) -> None:
    run = new_run()
    env = env_without_proxy()
    for expected in ("recorded", "replayed"):
        out = durable("run", "--run", run, "--dsn", pg_dsn, "--confdir", str(confdir), "--set", "ssl_insecure=true",
                      "--", "curl", "-s", "-D", "-", f"{https_api.url}/v1/search?q=curl", env=env)
        assert f"durable-outcome: {expected}" in out.stdout.lower() and '"query": "curl"' in out.stdout
    assert https_api.books()["calls"] == 1


def test_an_encrypted_journal_keeps_divergence_values_sealed(sidecars: Sidecars, http_api: PaidApi, fresh_dsn: str) -> None:
    """Field values in a divergence come from request bodies: sealed at rest like the bodies, never in
    the log (paths and keyed hashes only), and shown by `durable diff` only to a caller with the key."""
    import requests

    from durable_sidecar.store import crypto

    key = crypto.new_key_spec("k1")
    pg_dsn = fresh_dsn  # a key of its own: the shared database's rows must stay readable to other tests
    sidecar = sidecars.start(durable_encryption_key=key, durable_dsn=pg_dsn)
    run = new_run()
    for attempt, password in (("a1", "PASSWORD-SECRET111"), ("a2", "PASSWORD-SECRET222")):
        requests.post(f"{http_api.url}/v1/payments", json={"amount": 1, "password": password},
                      proxies={"http": sidecar.proxy_url(run, attempt)}, timeout=30)
    stored = sql(pg_dsn, "SELECT divergence::text FROM durable_steps WHERE run_id = %s AND divergence IS NOT NULL", run)
    assert stored and "SECRET" not in stored[0][0]
    assert "SECRET" not in sidecar.log() and "body/password" in sidecar.log()
    env = {k: v for k, v in os.environ.items() if k != crypto.ENV}
    without = durable("diff", run, "--dsn", pg_dsn, env=env).stdout
    assert "SECRET" not in without and "encrypted at rest" in without
    with_key = durable("diff", run, "--dsn", pg_dsn, env={**env, crypto.ENV: key}).stdout
    assert '"PASSWORD-SECRET111" -> "PASSWORD-SECRET222"' in with_key
    rotated = crypto.new_key_spec("k2")  # rekey re-seals the diff too: k2 alone then opens it
    durable("rekey", "--dsn", pg_dsn, env={**env, crypto.ENV: f"{rotated},{key}"})
    assert '"PASSWORD-SECRET111"' in durable("diff", run, "--dsn", pg_dsn, env={**env, crypto.ENV: rotated}).stdout


def test_a_reader_that_leaves_early_gets_no_broken_pipe_error() -> None:
    """`durable ... | head -1`: the pipe's reader is gone before durable writes; it exits quietly."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    read, write = os.pipe()
    os.close(read)  # the reader left
    done = subprocess.run([str(Path(sys.executable).with_name("durable")), "ca", "path"], stdout=write,
                          stderr=subprocess.PIPE, text=True, timeout=60)
    os.close(write)
    assert done.returncode == 0 and "Broken pipe" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
