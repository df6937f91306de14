"""Headers that choose the answer (matching/choice.py): two requests that differ only in them share
a fingerprint, and a resumed attempt that makes them in another order still gets each its own
answer, through a real sidecar, from an upstream that answers by what it saw; rotated credentials
still replay with no upstream call."""

from __future__ import annotations

import json

import pytest
import requests

from conftest import PaidApi, Sidecars, new_run

MULTIPART = "multipart/form-data; boundary=b0undary"


def multipart(language: str) -> bytes:
    return (f"--b0undary\r\nContent-Disposition: form-data; name=\"doc\"\r\nContent-Language: {language}\r\n\r\n"
            "same words\r\n--b0undary--\r\n").encode()


# class: (method, the two requests' headers, their bodies)
CLASSES = {
    "authorization": ("GET", [{"Authorization": "Bearer alice"}, {"Authorization": "Bearer bob"}], None),
    "x-tenant": ("GET", [{"X-Tenant": "acme"}, {"X-Tenant": "globex"}], None),
    "accept": ("GET", [{"Accept": "application/json"}, {"Accept": "text/csv"}], None),
    "accept-language": ("GET", [{"Accept-Language": "en"}, {"Accept-Language": "fr"}], None),
    "range": ("GET", [{"Range": "bytes=0-9"}, {"Range": "bytes=10-19"}], None),
    "if-none-match": ("GET", [{"If-None-Match": '"v1"'}, {"If-None-Match": '"v2"'}], None),
    "virtual-host": ("GET", [{"Host": "a.example"}, {"Host": "b.example"}], None),
    "content-type-params": ("POST", [{"Content-Type": "application/json; profile=a"},
                                     {"Content-Type": "application/json; profile=b"}], [b"{}", b"{}"]),
    "multipart-part-headers": ("POST", [{"Content-Type": MULTIPART}, {"Content-Type": MULTIPART}],
                               [multipart("en"), multipart("fr")]),
}


def call(sidecar, run: str, attempt: str, url: str, method: str, headers: dict, body: bytes | None) -> requests.Response:
    session = requests.Session()
    session.trust_env = False
    return session.request(method, url, headers=headers, data=body, timeout=30,
                           proxies={"http": sidecar.proxy_url(run, attempt)})


@pytest.mark.parametrize("kind", list(CLASSES))
def test_requests_told_apart_only_by_headers_get_their_own_answers_in_any_order(
    kind: str, sidecars: Sidecars, http_api: PaidApi
) -> None:
    method, headers, bodies = CLASSES[kind]
    bodies = bodies or [None, None]
    sidecar = sidecars.start()
    run = new_run()
    url = f"{http_api.url}/v1/whoami"
    first = [call(sidecar, run, "a1", url, method, h, b) for h, b in zip(headers, bodies, strict=True)]
    assert [r.headers["Durable-Outcome"] for r in first] == ["recorded", "recorded"]  # one fingerprint, two steps
    assert first[0].json()["saw"] != first[1].json()["saw"]
    calls = http_api.books()["calls"]
    again = [call(sidecar, run, "a2", url, method, h, b) for h, b in reversed(list(zip(headers, bodies, strict=True)))]
    assert [r.headers["Durable-Outcome"] for r in again] == ["replayed", "replayed"]
    assert [r.content for r in again] == [first[1].content, first[0].content]  # each its own answer
    assert http_api.books()["calls"] == calls


def test_rotated_credentials_still_replay_with_no_upstream_call(sidecars: Sidecars, http_api: PaidApi) -> None:
    """A fresh key on restart matches no journaled step's credentials: occurrence order decides, as
    before, and the resumed run is answered from the journal."""
    sidecar = sidecars.start()
    run = new_run()
    url = f"{http_api.url}/v1/whoami"
    old = [call(sidecar, run, "a1", url, "GET", {"Authorization": f"Bearer old-{n}"}, None) for n in (1, 2)]
    calls = http_api.books()["calls"]
    new = [call(sidecar, run, "a2", url, "GET", {"Authorization": f"Bearer new-{n}"}, None) for n in (1, 2)]
    assert [r.headers["Durable-Outcome"] for r in new] == ["replayed", "replayed"]
    assert [r.content for r in new] == [r.content for r in old] and http_api.books()["calls"] == calls


def test_credentials_are_journaled_as_a_keyed_hash_only(sidecars: Sidecars, http_api: PaidApi, pg_dsn: str) -> None:
    from conftest import sql

    sidecar = sidecars.start()
    run = new_run()
    call(sidecar, run, "a1", f"{http_api.url}/v1/whoami", "GET", {"Authorization": "Bearer s3cret-token"}, None)
    ((chosen,),) = sql(pg_dsn, "SELECT choice FROM durable_steps WHERE run_id = %s", run)
    assert chosen.startswith("redacted:hmac-sha256:")
    dump = json.dumps(sql(pg_dsn, "SELECT row_to_json(s)::text FROM durable_steps s WHERE run_id = %s", run))
    assert "s3cret-token" not in dump


def test_what_chooses_an_answer_and_what_does_not() -> None:
    """Pure logic of matching/choice.py: listed headers by name, case and order aside; a Host header
    only when it names another host than the URL; Content-Type parameters but charset and boundary."""
    from mitmproxy.test import tutils

    from durable_sidecar.matching import choice

    names = frozenset(choice.HEADERS)

    def parts(**headers: str) -> list[list[str]]:
        request = tutils.treq(host="api.test", port=443, authority=b"api.test:443")
        request.headers.clear()
        for k, v in headers.items():
            request.headers[k.replace("_", "-")] = v
        return choice.parts(request, b"", names)

    assert parts(Authorization="Bearer a", User_Agent="x", X_Stainless_Os="y") == [["authorization", "Bearer a"]]
    assert parts(Host="api.test") == parts(Host="API.test:443") == [] and parts(Host="b.test") == [["host", "b.test"]]
    assert parts(Content_Type="application/json; charset=utf-8") == []
    assert parts(Content_Type="multipart/form-data; boundary=x1") == []
    assert parts(Content_Type="text/plain; format=flowed") == [["content-type", "format=flowed"]]
    assert choice.digest(tutils.treq(), b"", frozenset(), lambda b: "h") is None  # nothing chooses: no digest
