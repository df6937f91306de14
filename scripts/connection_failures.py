#!/usr/bin/env python3
"""Exactly-once when a connection fails, not a process: each scenario N times, as a table.

Real processes (mitmdump sidecars, `durable run`, agents), a real PostgreSQL reached through a TCP
relay that cuts, freezes or loses replies (scripts/relay.py), and the local paid API over HTTPS on
its two endpoints (see agent_failures.py): honours-key (payments) and ignores-key (generations, like
the LLM APIs). Under `durable_in_doubt=fail` wherever a scenario allows it, the worst case for a
key-ignoring upstream. The books judge; per run:
  double charges   calls booked beyond those the agent asked for
  re-sends         calls that reached the upstream beyond those asked for (a key-honouring upstream
                   deduplicates them: no charge, but a step sent twice)
  wrong answers    an answer other than the one booked for that call
  lost answers     a call booked whose answer no attempt ever got
  stuck steps      steps still pending once the scenario is over
  longest wait     the longest an agent waited for an answer of some kind while the link was broken

Scenarios (tests/test_connection_failures.py runs each once):
  lease-terminated     sidecar A's lease session is terminated mid-call; attempt 2 makes the call on B
  lease-idle-timeout   the same, the session ended by the database's idle_session_timeout of 2 s
  link-cut-mid-call    the journal's link is cut while the upstream works, and heals: the answer is held
  commit-reply-lost    the pending row commits but its reply is lost: the call was never forwarded
  one-reply-lost       the same on one pooled connection while the others work (the journal's own
                       retry finds the row): the call is sent once, at once, not called in doubt
  link-frozen          the link freezes (no reset): every call is answered within durable_db_timeout + 1 s
  run-drains           `durable run`'s agent dies mid-call: the launcher's sidecar drains before it exits
  same-shell-rerun     the agent is started twice under one exported attempt id
  hangup-commit-fails  an MCP client hangs up at its response while the journal's link is cut

Usage: .venv/bin/python scripts/connection_failures.py [--runs 20] [--dsn DSN] [--only SCENARIO]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import paid_api  # noqa: E402
from agent_failures import ENDPOINTS, Rig, arguments, isolated, sql  # noqa: E402
from relay import Relay  # noqa: E402

from durable_sidecar.store import database, lease

DB_TIMEOUT_MS = 1000
PENDING = "SELECT count(*) FROM durable_steps WHERE state = 'pending'"  # steps in doubt, or stuck
PAID_PATHS = {path for path, _ in ENDPOINTS.values()}
DURABLE = str(Path(sys.executable).with_name("durable"))


@dataclass
class Result:
    double_charges: int = 0
    resends: int = 0
    wrong_answers: int = 0
    lost_answers: int = 0
    stuck_steps: int = 0
    longest_wait_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def ok(self) -> bool:
        return not (self.double_charges or self.resends or self.wrong_answers or self.lost_answers or self.stuck_steps)


def booked_ids(rig: Rig) -> list[str]:
    """What the upstream put in each paid answer it booked, in order: pay_N or chatcmpl-N (N counts
    every booking; searches and other warm-up calls are not judged)."""
    prefix = {"payment": "pay_", "generation": "chatcmpl-"}
    return [prefix[b["kind"]] + str(n) for n, b in enumerate(rig.books()["booked"], 1) if b["kind"] in prefix]


def judge(rig: Rig, answers: list[str], result: Result, calls: int = 1) -> Result:
    """`calls` logical calls were made; every answer must be the booked answer of one of them."""
    books = rig.books()
    booked = booked_ids(rig)
    result.double_charges += max(0, len(booked) - calls)
    paid = sum(1 for r in books["requests"] if r["path"].split("?")[0] in PAID_PATHS)
    result.resends += max(0, paid - calls)
    got = set()
    for answer in answers:
        match = next((b for b in booked if f'"{b}"' in answer), None)
        if match is None:
            result.wrong_answers += 1
            result.notes.append(f"answer {answer[:80]!r}, booked {booked}")
        got.add(match)
    result.lost_answers += len([b for b in booked if b not in got])
    result.stuck_steps += sql(rig.dsn, PENDING)[0][0]
    return result


def target(rig: Rig, endpoint: str, delay_ms: int = 0) -> tuple[str, dict[str, Any]]:
    path, body = ENDPOINTS[endpoint]
    return f"{rig.api_url}{path}" + (f"?delay_ms={delay_ms}" if delay_ms else ""), body


def retry_until_answered(client: httpx.Client, url: str, body: dict, seconds: float = 30) -> httpx.Response:
    """What an SDK does with the sidecar's 503: retry, in the same attempt (a 409 is final)."""
    deadline = time.monotonic() + seconds
    while (r := client.post(url, json=body)).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    return r


def wait_for_calls(rig: Rig, calls: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while rig.books()["calls"] < calls:
        if time.monotonic() > deadline:
            raise TimeoutError("the upstream never received the call")
        time.sleep(0.02)


@contextmanager
def relayed(rig: Rig) -> Iterator[tuple[Relay, str]]:
    relay, dsn = Relay.for_dsn(rig.dsn)
    try:
        yield relay, dsn
    finally:
        relay.close()


def in_background(work: Callable[[], httpx.Response]) -> tuple[threading.Thread, dict[str, httpx.Response]]:
    out: dict[str, httpx.Response] = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", work()))
    thread.start()
    return thread, out


# -- scenarios ------------------------------------------------------------------------------------


def lease_lost(rig: Rig, endpoint: str, how: str) -> Result:
    """A's lease session ends while A's call (4 s) is in flight; attempt 2 makes the call on B."""
    if how == "idle-timeout":
        with psycopg.connect(rig.admin_dsn, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{psycopg.conninfo.conninfo_to_dict(rig.dsn)["dbname"]}"'
                         " SET idle_session_timeout = '2s'")
    a, b = rig.sidecar(), rig.sidecar()  # the default policy, reissue: B must wait for A, not re-send
    url, body = target(rig, endpoint, delay_ms=4000)
    run = f"lease-{uuid.uuid4().hex[:8]}"
    with rig.client(a, run, "a1") as first, rig.client(b, run, "a2") as second:
        thread, out = in_background(lambda: first.post(url, json=body))
        wait_for_calls(rig, 1)
        if how == "terminated":
            lease_id = httpx.get("http://durable.sidecar/health", proxy=f"http://127.0.0.1:{a.port}").json()["lease"]
            sql(rig.dsn, "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'"
                         " AND classid = %s AND objid = %s AND granted", lease.CLASS, lease_id)
        time.sleep(2.5)  # past the idle timeout: without a kept-alive lease, B would take the step over now
        again = second.post(url, json=body)  # no retry: a 409 or 503 here would be a false alarm
        thread.join()
    return judge(rig, [out["r"].text, again.text], Result())


def link_cut_mid_call(rig: Rig, endpoint: str) -> Result:
    """The link is cut while the upstream works on the call and heals 1 s after it answered."""
    with relayed(rig) as (relay, dsn):
        sidecar = rig.sidecar(durable_dsn=dsn, durable_in_doubt="127.0.0.1=fail")
        url, body = target(rig, endpoint, delay_ms=1500)
        run = f"cut-{uuid.uuid4().hex[:8]}"
        result = Result()
        with rig.client(sidecar, run, "a1") as agent:
            thread, out = in_background(lambda: agent.post(url, json=body))
            wait_for_calls(rig, 1)
            relay.cut()
            thread.join()
            threading.Timer(1.0, relay.heal).start()
            answer = retry_until_answered(agent, url, body)
        with rig.client(sidecar, run, "a2") as later:
            replayed = later.post(url, json=body)
        if "holds the answer" not in out["r"].text:
            result.notes.append(f"first answer: {out['r'].status_code} {out['r'].text[:80]}")
        return judge(rig, [answer.text, replayed.text], result)


def commit_reply_lost(rig: Rig, endpoint: str, only_one: bool) -> Result:
    """The pending commit's reply is lost: the sidecar never forwarded the call; it is sent once,
    even under `fail`. On every connection until the link heals (the agent gets a 503 and retries),
    or `only_one`: on its own connection while the pool's others work, so that the journal's own
    retry finds the row its first try made."""
    with relayed(rig) as (relay, dsn):
        sidecar = rig.sidecar(durable_dsn=dsn, durable_in_doubt="127.0.0.1=fail")
        url, body = target(rig, endpoint)
        run = f"lost-{uuid.uuid4().hex[:8]}"
        result = Result()
        with rig.client(sidecar, run, "a1") as agent:
            agent.get(f"{rig.api_url}/v1/search?q=warm")  # the run's index and the lease are in
            if only_one:
                relay.drop_reply_with(b"idempotency_key")  # the column durable_record's reply names
            else:
                relay.drop_replies()
                lost = agent.post(url, json=body)
                relay.heal()
                if lost.status_code != 503:
                    result.notes.append(f"the lost commit answered {lost.status_code}")
            answer = retry_until_answered(agent, url, body)
        with rig.client(sidecar, run, "a2") as later:
            later.get(f"{rig.api_url}/v1/search?q=warm")
            replayed = later.post(url, json=body)
        if only_one and relay.mode != "pass":
            result.notes.append("no reply was lost: the scenario did not happen")
            result.stuck_steps += 1
        return judge(rig, [answer.text, replayed.text], result)


def link_frozen(rig: Rig, endpoint: str) -> Result:
    """The link freezes for 6 s: a new call, a replay read ahead and a call of another run are each
    answered (503 or the journaled answer) within durable_db_timeout + 1 s; after it heals, the
    retries go through, once."""
    with relayed(rig) as (relay, dsn):
        sidecar = rig.sidecar(durable_dsn=dsn)
        url, body = target(rig, endpoint)
        run = f"frozen-{uuid.uuid4().hex[:8]}"
        result = Result()
        with rig.client(sidecar, run, "a1") as a1, rig.client(sidecar, run, "a2") as a2, \
                rig.client(sidecar, f"other-{run}", "a1") as other:
            recorded = a1.post(url, json=body)
            a2.post(url, json=body)  # a2 replays it: its read-ahead is in memory
            relay.freeze()
            threading.Timer(6.0, relay.heal).start()
            for client in (a1, other):
                started = time.monotonic()
                client.post(f"{url}{'&' if '?' in url else '?'}n=2", json=body)
                result.longest_wait_s = max(result.longest_wait_s, time.monotonic() - started)
            answers = [recorded.text]
            for client in (a1, other):
                answers.append(retry_until_answered(client, f"{url}{'&' if '?' in url else '?'}n=2", body).text)
        return judge(rig, answers, result, calls=3)


def mcp_call(
    client: httpx.Client, url: str, session: str | None, rpc_id: int, method: str, at_response: Callable[[], None] = str
) -> tuple[str, str | None]:
    """An MCP client's call: read the event stream up to the response to `rpc_id`, then hang up
    (`at_response` runs between the two)."""
    headers = {"Accept": "application/json, text/event-stream"} | ({"Mcp-Session-Id": session} if session else {})
    with client.stream("POST", url, json={"jsonrpc": "2.0", "id": rpc_id, "method": method}, headers=headers) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and json.loads(line[5:]).get("id") == rpc_id:
                at_response()
                return line, r.headers.get("mcp-session-id")
    return "", None


def hangup_commit_fails(rig: Rig, endpoint: str) -> Result:
    """An MCP client reads its tool call's response and hangs up while the server keeps the stream
    open; the journal's link is cut at that moment, so the answer's commit fails. The answer is held
    and journaled when the link heals; the next attempt replays it (one tool call upstream)."""
    with relayed(rig) as (relay, dsn):
        sidecar = rig.sidecar(durable_dsn=dsn)
        url, run = f"{rig.api_url}/mcp?hold_ms=3000", f"mcp-{uuid.uuid4().hex[:8]}"
        with rig.client(sidecar, run, "a1") as agent:
            _, session = mcp_call(agent, url, None, 1, "initialize")
            first, _ = mcp_call(agent, url, session, 2, "tools/call", at_response=relay.cut)
            time.sleep(3)  # longer than the commit's own deadline and retry: it fails, the answer is held
            relay.heal()
        # the held answer's commit is retried every 0.5 s; a pool that reconnects after a cut may take
        # longer on a busy machine (seen in CI): wait for it, bounded, instead of a fixed pause
        deadline = time.monotonic() + 15
        while sql(rig.dsn, PENDING)[0][0] and time.monotonic() < deadline:
            time.sleep(0.25)
        with rig.client(sidecar, run, "a2") as later:
            mcp_call(later, url, session, 1, "initialize")
            again, _ = mcp_call(later, url, session, 2, "tools/call")
    books = rig.books()
    tools = sum(1 for b in books["booked"] if b["kind"] == "tool")
    calls = sum(1 for r in books["requests"] if r["path"].startswith("/mcp"))
    result = Result(double_charges=max(0, tools - 1), resends=max(0, calls - 2))  # initialize and the tool, once each
    if not first or again != first:
        result.wrong_answers += 1
        result.notes.append(f"first {first[:60]!r}, again {again[:60]!r}")
    result.stuck_steps = sql(rig.dsn, PENDING)[0][0]
    return result


DYING_AGENT = """
import json, os, sys, threading, time, requests
call = lambda: requests.post(sys.argv[1], json=json.loads(sys.argv[2]), timeout=60)  # noqa: E731
threading.Thread(target=call, daemon=True).start()
time.sleep(0.5)
os._exit(3)  # dies while the upstream works on its call
"""
AGENT = """
import json, sys, requests
print(requests.post(sys.argv[1], json=json.loads(sys.argv[2]), timeout=60).text)
"""


def run_drains(rig: Rig, endpoint: str) -> Result:
    """`durable run` with its own sidecar; its agent dies mid-call; the next run of the agent."""
    url, body = target(rig, endpoint, delay_ms=1500)
    run = f"drain-{uuid.uuid4().hex[:8]}"
    answers = []
    for agent in (DYING_AGENT, AGENT):
        out = subprocess.run([DURABLE, "run", "--run", run, "--dsn", rig.dsn, "--confdir", str(rig.confdir),
                              "--set", f"ssl_verify_upstream_trusted_ca={rig.api_ca}",
                              "--", sys.executable, "-c", agent, url, json.dumps(body)],
                             capture_output=True, text=True, timeout=120)
        answers.append(out.stdout)
    return judge(rig, answers[1:], Result())


SHELL_AGENT = """
for i in 1 2 3; do
  curl -s --cacert "$CA" -x "$PROXY" -H 'content-type: application/json' -d "$BODY" "$URL"; echo
done
"""


def same_shell_rerun(rig: Rig, endpoint: str) -> Result:
    """A shell script calling curl three times (one start), then the same command line again with the
    same exported run and attempt ids (a second start, as an interactive shell makes it)."""
    sidecar = rig.sidecar()
    url, body = target(rig, endpoint)
    body = {**body, "n": str(uuid.uuid4())}  # three polls of one URL: three calls, three answers
    env = {"PROXY": sidecar.proxy_url(f"shell-{uuid.uuid4().hex[:8]}", "exported-once"), "URL": url,
           "BODY": json.dumps(body), "CA": str(rig.bundle()), "PATH": "/usr/bin:/bin"}
    answers = []
    for _ in range(2):
        out = subprocess.run(["sh", "-c", SHELL_AGENT], env=env, capture_output=True, text=True, timeout=60,
                             start_new_session=True)
        answers += out.stdout.split("\n")[:3]
    result = judge(rig, answers, Result(), calls=3)
    if endpoint == "honours-key" and answers[:3] != answers[3:]:
        result.wrong_answers += 1
        result.notes.append("the second start's answers differ from the first's")
    return result


SCENARIOS: dict[str, Callable[[Rig, str], Result]] = {
    "lease-terminated": lambda rig, endpoint: lease_lost(rig, endpoint, "terminated"),
    "lease-idle-timeout": lambda rig, endpoint: lease_lost(rig, endpoint, "idle-timeout"),
    "link-cut-mid-call": link_cut_mid_call,
    "commit-reply-lost": lambda rig, endpoint: commit_reply_lost(rig, endpoint, only_one=False),
    "one-reply-lost": lambda rig, endpoint: commit_reply_lost(rig, endpoint, only_one=True),
    "link-frozen": link_frozen,
    "run-drains": run_drains,
    "same-shell-rerun": same_shell_rerun,
    "hangup-commit-fails": hangup_commit_fails,
}
BOUND_S = DB_TIMEOUT_MS / 1000 + 1  # the longest an agent may wait for an answer of some kind


def run_once(rig: Rig, scenario: str, endpoint: str) -> Result:
    """One run of a scenario in a database of its own, with the upstream's books cleared."""
    return isolated(rig, "durable_links", lambda: SCENARIOS[scenario](rig, endpoint))


def main() -> None:
    args = arguments(__doc__ or "", list(SCENARIOS))

    admin = database.resolve(args.dsn).dsn
    with tempfile.TemporaryDirectory(prefix="durable-links-") as tmp:
        work = Path(tmp)
        api, port = paid_api.spawn(work / "api", tls=True)
        rig = Rig(work, f"https://127.0.0.1:{port}", work / "api" / "tls" / "ca.pem", admin, work / "certs")
        print("| scenario | upstream | runs | double charges | re-sends | wrong answers | lost answers | stuck steps"
              " | longest wait |")
        print("|---|---|---|---|---|---|---|---|---|")
        try:
            for scenario in args.only or list(SCENARIOS):
                for endpoint in sorted(ENDPOINTS):
                    total = Result()
                    for _ in range(args.runs):
                        r = run_once(rig, scenario, endpoint)
                        total.double_charges += r.double_charges
                        total.resends += r.resends
                        total.wrong_answers += r.wrong_answers
                        total.lost_answers += r.lost_answers
                        total.stuck_steps += r.stuck_steps
                        total.longest_wait_s = max(total.longest_wait_s, r.longest_wait_s)
                        total.notes += r.notes
                    wait = f"{total.longest_wait_s:.2f} s" if scenario == "link-frozen" else "-"
                    print(f"| `{scenario}` | {endpoint} | {args.runs} | {total.double_charges} | {total.resends}"
                          f" | {total.wrong_answers}"
                          f" | {total.lost_answers} | {total.stuck_steps} | {wait} |", flush=True)
                    for note in total.notes[:3]:
                        print(f"    {note}", file=sys.stderr)
        finally:
            api.kill()
            api.wait()


if __name__ == "__main__":
    main()
