"""HTTP/2 as clients speak it: a client that offers h2 gets h2 from the sidecar (recording and
replaying), though the sidecar opens no upstream connection before answering the client's TLS
handshake (httpx lists http/1.1 before h2: mitmproxy alone would take http/1.1)."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import httpx

from conftest import PaidApi, Sidecars, new_run


def test_httpx_with_http2_gets_h2_recorded_and_replayed_byte_identical(
    sidecars: Sidecars, ca_bundle: Path, https_api: PaidApi
) -> None:
    sidecar = sidecars.start()
    run = new_run()
    verify = ssl.create_default_context(cafile=str(ca_bundle))
    answers = []
    for attempt in ("a1", "a2"):
        with httpx.Client(proxy=sidecar.proxy_url(run, attempt), http2=True, verify=verify, trust_env=False) as client:
            r = client.post(f"{https_api.url}/v1/chat/completions", json={"model": "m", "messages": []})
        assert r.http_version == "HTTP/2" and r.status_code == 200
        answers.append((r.headers["durable-outcome"], r.content))
    assert [outcome for outcome, _ in answers] == ["recorded", "replayed"]
    assert answers[0][1] == answers[1][1]
    assert https_api.books()["calls"] == 1


def test_curl_http2_and_an_http1_only_client(sidecars: Sidecars, ca_bundle: Path, https_api: PaidApi) -> None:
    sidecar = sidecars.start()
    run = new_run()
    url = f"{https_api.url}/v1/search?q=h2"

    def curl(*flags: str) -> str:
        return subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_version}", *flags, "-x",
                               sidecar.proxy_url(run, "c1"), "--cacert", str(ca_bundle), url],
                              capture_output=True, text=True, check=True).stdout

    assert curl("--http2") == "2"
    assert curl("--http1.1") == "1.1"  # a client that offers only http/1.1 keeps it
    verify = ssl.create_default_context(cafile=str(ca_bundle))
    with httpx.Client(proxy=sidecar.proxy_url(run, "c2"), verify=verify, trust_env=False) as client:
        assert client.get(url).http_version == "HTTP/1.1"  # httpx without http2=True offers http/1.1 alone
