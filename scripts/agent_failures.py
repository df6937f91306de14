#!/usr/bin/env python3
"""Exactly-once when the agent, not the sidecar, is what fails: each scenario N times, as a table.

Every scenario runs real processes (mitmdump sidecars, agent processes killed with SIGKILL, a real
PostgreSQL with a real outage) against the local paid API over HTTPS, on two endpoints:
  honours-key  POST /v1/payments   dedupes a repeated Idempotency-Key, like Stripe
  ignores-key  POST /v1/generate   books every call, like the LLM APIs (no idempotency key documented)
and reads the upstream's books. A scenario counts, per run:
  double charges        calls booked beyond the one the agent asked for
  wrong answers         an attempt that saw a different answer than the one booked, or none at all
  forbidden re-sends    calls that reached the upstream again where the rules forbid it: with
                        durable_in_doubt=fail for that host, or while the step was in flight (single flight)

Scenarios (the tests in tests/test_agent_failures.py run each once):
  agent-killed          the agent is SIGKILLed while the upstream works on its call; a new attempt resumes
                        (default policy, reissue, on both endpoints: the sidecar finishes the orphaned call)
  agent-killed-stream   the agent is SIGKILLed mid-way through an event stream (an LLM generation)
  sidecar-503-retry     the journal goes away while the upstream works: the sidecar answers 503, and the
                        agent retries in the same attempt once it is back
  overlapping-attempts  a second attempt of the run makes the same call while the first has it in flight
  two-sidecars          the same, the two attempts on two sidecars sharing the journal
  stale-index           the second attempt loaded the run while the step was in flight, and reaches it after
  racing-record         two attempts on two sidecars send the same new call at the same moment

Usage: .venv/bin/python scripts/agent_failures.py [--runs 20] [--dsn DSN] [--only SCENARIO]
"""

from __future__ import annotations

import argparse
import json
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import paid_api  # noqa: E402

from durable_sidecar.store import database
from durable_sidecar.tools import launcher

DELAY_MS = 1500  # the upstream books the call, then works this long before answering
ENDPOINTS = {
    "honours-key": ("/v1/payments", {"amount": 7}),
    "ignores-key": ("/v1/generate", {"prompt": "summarise the quarter"}),
}

AGENT = """
import json, sys, requests
r = requests.post(sys.argv[1], json=json.loads(sys.argv[2]), timeout=60, stream=True)
body = b"".join(r.iter_content(None))  # a stream is read as it comes, like an SDK does
print(json.dumps({"status": r.status_code, "outcome": r.headers.get("durable-outcome"), "body": body.decode()}))
"""


@dataclass
class Rig:
    """What a scenario needs: a way to start sidecars, the paid API, the journal's databases."""

    workdir: Path
    api_url: str
    api_ca: Path
    admin_dsn: str  # may create and drop databases
    confdir: Path
    started: list[launcher.Sidecar] = field(default_factory=list)
    dsn: str = ""  # this scenario run's own database

    def sidecar(self, **options: str) -> launcher.Sidecar:
        opts = {"durable_dsn": self.dsn, "ssl_verify_upstream_trusted_ca": str(self.api_ca), "durable_db_timeout": "1000"}
        opts.update(options)
        sidecar = launcher.start_sidecar(self.confdir, opts, log_path=self.workdir / f"sidecar-{uuid.uuid4().hex[:6]}.log")
        self.started.append(sidecar)
        return sidecar

    def bundle(self) -> Path:
        path = self.workdir / "bundle.pem"
        if not path.exists():
            launcher.write_ca_bundle(self.confdir / launcher.CA_CERT, path)
        return path

    def books(self) -> dict[str, Any]:
        return httpx.get(f"{self.api_url}/_books", verify=trusting(self.api_ca), trust_env=False).json()

    def reset(self) -> None:
        httpx.post(f"{self.api_url}/_reset", verify=trusting(self.api_ca), trust_env=False).raise_for_status()

    def client(self, sidecar: launcher.Sidecar, run: str, attempt: str, timeout: float = 60) -> httpx.Client:
        return httpx.Client(proxy=sidecar.proxy_url(run, attempt), verify=trusting(self.bundle()), trust_env=False,
                            timeout=timeout)

    def close(self) -> None:
        for sidecar in self.started:
            sidecar.kill()
        self.started.clear()


@dataclass
class Result:
    double_charges: int = 0
    wrong_answers: int = 0
    forbidden_resends: int = 0
    notes: list[str] = field(default_factory=list)

    def ok(self) -> bool:
        return not (self.double_charges or self.wrong_answers or self.forbidden_resends)


def url(rig: Rig, endpoint: str) -> tuple[str, dict[str, Any]]:
    path, body = ENDPOINTS[endpoint]
    return f"{rig.api_url}{path}?delay_ms={DELAY_MS}", body


def wait_for_booking(rig: Rig, calls: int = 1, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while rig.books()["calls"] < calls:
        if time.monotonic() > deadline:
            raise TimeoutError("the upstream never received the call")
        time.sleep(0.02)


def booked_answer(rig: Rig) -> str:
    """The id the upstream put in the answer it booked first: pay_1 or chatcmpl-1."""
    return "pay_1" if rig.books()["booked"][0]["kind"] == "payment" else "chatcmpl-1"


def judge(rig: Rig, answers: list[str | None], policy: str, result: Result) -> Result:
    """Read the books: one charge, every answer the booked one (a refusal under `fail` is not wrong)."""
    books = rig.books()
    result.double_charges += max(0, len(books["booked"]) - 1)
    if policy == "fail":
        result.forbidden_resends += max(0, books["calls"] - 1)
    expected = booked_answer(rig) if books["booked"] else None
    for answer in answers:
        if answer == "refused" and policy == "fail":
            continue
        if answer is None or expected is None or expected not in answer:
            result.wrong_answers += 1
            result.notes.append(f"answer {str(answer)[:80]!r}, booked {expected}")
    return result


def policy_options(endpoint: str) -> tuple[str, dict[str, str]]:
    """Key-ignoring upstreams are what durable_in_doubt=fail is for; key-honouring ones reissue."""
    policy = "fail" if endpoint == "ignores-key" else "reissue"
    return policy, {"durable_in_doubt": f"127.0.0.1={policy}"}


def answer_of(response: httpx.Response) -> str:
    if response.headers.get("durable-outcome") == "refused" and response.status_code in (409, 503):
        return "refused"
    return response.text


# -- scenarios ------------------------------------------------------------------------------------


def agent_killed(rig: Rig, endpoint: str, stream: bool = False) -> Result:
    # The default policy, reissue, on both endpoints: the sidecar outlives the agent and finishes the
    # call (an orphan), so even a key-ignoring upstream must book it once.
    policy = "reissue"
    sidecar = rig.sidecar()
    run, (target, body) = f"killed-{uuid.uuid4().hex[:8]}", url(rig, endpoint)
    if stream:  # no wait before the answer: the events come 150 ms apart, the agent dies after a few
        path = "/v1/chat/completions" if endpoint == "honours-key" else ENDPOINTS[endpoint][0]
        target = f"{rig.api_url}{path}"
        body = {"messages": [{"role": "user", "content": "stream it"}], "prompt": "stream it", "stream": True,
                "x_event_delay_ms": 150}
    env = launcher.agent_env(sidecar.proxy_url(run, "a1"), rig.bundle())
    agent = subprocess.Popen([sys.executable, "-c", AGENT, target, json.dumps(body)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    wait_for_booking(rig)
    if stream:
        time.sleep(0.5)  # a few events in
    agent.send_signal(signal.SIGKILL)  # the agent dies while the upstream works on its call
    agent.wait()
    time.sleep(0.3)  # the sidecar notices the hang-up
    answers = []
    for attempt in ("a2", "a3"):
        env = launcher.agent_env(sidecar.proxy_url(run, attempt), rig.bundle())
        out = subprocess.run([sys.executable, "-c", AGENT, target, json.dumps(body)], env=env,
                             capture_output=True, text=True, timeout=60)
        seen = json.loads(out.stdout) if out.stdout.strip() else {}
        refused = seen.get("outcome") == "refused" and seen.get("status") in (409, 503)
        answers.append("refused" if refused else seen.get("body"))
    return judge(rig, answers, policy, Result())


def sidecar_503_retry(rig: Rig, endpoint: str) -> Result:
    policy, options = policy_options(endpoint)
    sidecar = rig.sidecar(**options)
    run, (target, body) = f"outage-{uuid.uuid4().hex[:8]}", url(rig, endpoint)
    dbname = psycopg.conninfo.conninfo_to_dict(rig.dsn)["dbname"]
    answers: list[str | None] = []
    with rig.client(sidecar, run, "a1") as agent:
        first: dict[str, httpx.Response] = {}
        thread = threading.Thread(target=lambda: first.update(r=agent.post(target, json=body)))
        thread.start()
        wait_for_booking(rig)
        set_connections(rig.admin_dsn, dbname, allowed=False)  # the journal goes away mid-call
        thread.join()
        set_connections(rig.admin_dsn, dbname, allowed=True)
        if first["r"].status_code != 503:
            return Result(wrong_answers=1, notes=[f"expected the sidecar's 503, got {first['r'].status_code}"])
        deadline = time.monotonic() + 30
        while (retry := agent.post(target, json=body)).status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.2)  # the agent's SDK retries 503s, in the same attempt
        answers.append(answer_of(retry))
    with rig.client(sidecar, run, "a2") as later:
        answers.append(answer_of(later.post(target, json=body)))
    return judge(rig, answers, policy, Result())


def overlapping(rig: Rig, endpoint: str, two_sidecars: bool = False, together: bool = False) -> Result:
    first = rig.sidecar()
    second = rig.sidecar() if two_sidecars else first
    run, (target, body) = f"overlap-{uuid.uuid4().hex[:8]}", url(rig, endpoint)
    answers: dict[str, str] = {}
    start = threading.Barrier(2, timeout=30)
    rig.bundle()  # made once, before the threads use it

    def attempt(sidecar: launcher.Sidecar, name: str, delay: float) -> None:
        with rig.client(sidecar, run, name) as agent:
            start.wait()
            time.sleep(delay)
            answers[name] = answer_of(agent.post(target, json=body))

    threads = [threading.Thread(target=attempt, args=(first, "a1", 0.0)),
               threading.Thread(target=attempt, args=(second, "a2", 0.0 if together else DELAY_MS / 3000))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = judge(rig, [answers.get("a1"), answers.get("a2")], "reissue", Result())
    result.forbidden_resends += max(0, rig.books()["calls"] - 1)  # single flight: waited for, never re-sent
    seqs = sql(rig.dsn, "SELECT seq FROM durable_steps WHERE run_id = %s ORDER BY seq", run)
    if seqs != [(1,)]:
        result.wrong_answers += 1
        result.notes.append(f"journal holds seqs {seqs}")
    return result


def stale_index(rig: Rig, endpoint: str) -> Result:
    sidecar = rig.sidecar()
    run, (target, body) = f"stale-{uuid.uuid4().hex[:8]}", url(rig, endpoint)
    warmup = f"{rig.api_url}/v1/search?q=first"
    with rig.client(sidecar, run, "a1") as a1, rig.client(sidecar, run, "a2") as a2:
        a1.get(warmup)
        slow: dict[str, httpx.Response] = {}
        thread = threading.Thread(target=lambda: slow.update(r=a1.post(target, json=body)))
        thread.start()
        wait_for_booking(rig, calls=2)
        a2.get(warmup)  # the second attempt loads the run's index now: step 2 is pending in it
        thread.join()
        late = a2.post(target, json=body)  # step 2 completed meanwhile
    books = rig.books()
    result = Result(double_charges=max(0, sum(1 for b in books["booked"] if b["kind"] != "search") - 1),
                    forbidden_resends=max(0, books["calls"] - 2))
    expected = "pay_2" if endpoint == "honours-key" else "chatcmpl-2"  # the search was call 1
    for response in (slow["r"], late):
        if expected not in response.text:
            result.wrong_answers += 1
            result.notes.append(f"answer {response.text[:80]!r}, booked {expected}")
    if late.headers.get("durable-outcome") != "replayed":
        result.wrong_answers += 1
        result.notes.append(f"the late attempt's outcome was {late.headers.get('durable-outcome')}")
    return result


SCENARIOS: dict[str, Callable[[Rig, str], Result]] = {
    "agent-killed": agent_killed,
    "agent-killed-stream": lambda rig, endpoint: agent_killed(rig, endpoint, stream=True),
    "sidecar-503-retry": sidecar_503_retry,
    "overlapping-attempts": overlapping,
    "two-sidecars": lambda rig, endpoint: overlapping(rig, endpoint, two_sidecars=True),
    "stale-index": stale_index,
    "racing-record": lambda rig, endpoint: overlapping(rig, endpoint, two_sidecars=True, together=True),
}


def isolated[T](rig: Rig, prefix: str, work: Callable[[], T]) -> T:
    """`work` in a database of its own with the upstream's books cleared; its sidecars and database
    are gone afterwards (shared with connection_failures.py)."""
    rig.dsn = database.create_database(rig.admin_dsn, prefix)
    rig.reset()
    try:
        return work()
    finally:
        rig.close()
        database.drop_database(rig.admin_dsn, rig.dsn)


def arguments(doc: str, scenarios: list[str]) -> argparse.Namespace:
    """The command line both failure tables take: --runs, --dsn, --only."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--dsn", help="a PostgreSQL that may create databases (default: $DATABASE_URL, else embedded)")
    parser.add_argument("--only", choices=sorted(scenarios), action="append")
    return parser.parse_args()


def run_once(rig: Rig, scenario: str, endpoint: str) -> Result:
    """One run of a scenario in a database of its own, with the upstream's books cleared."""
    return isolated(rig, "durable_failures", lambda: SCENARIOS[scenario](rig, endpoint))


# -- helpers --------------------------------------------------------------------------------------


def trusting(cafile: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cafile))


def set_connections(admin_dsn: str, dbname: str, allowed: bool) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS {str(allowed).lower()}')
        if not allowed:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (dbname,))


def sql(dsn: str, query: str, *params: Any) -> list[tuple]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


def main() -> None:
    args = arguments(__doc__ or "", list(SCENARIOS))

    admin = database.resolve(args.dsn).dsn
    with tempfile.TemporaryDirectory(prefix="durable-failures-") as tmp:
        work = Path(tmp)
        api, port = paid_api.spawn(work, tls=True)
        rig = Rig(work, f"https://127.0.0.1:{port}", work / "tls" / "ca.pem", admin, work / "conf")
        print(f"{'scenario':22} {'upstream':12} {'runs':>5} {'double charges':>15} {'wrong answers':>14} "
              f"{'forbidden re-sends':>19}")
        failed = False
        try:
            for scenario in args.only or SCENARIOS:
                for endpoint in ENDPOINTS:
                    total = Result()
                    for _ in range(args.runs):
                        one = run_once(rig, scenario, endpoint)
                        total.double_charges += one.double_charges
                        total.wrong_answers += one.wrong_answers
                        total.forbidden_resends += one.forbidden_resends
                        total.notes += one.notes
                    failed |= not total.ok()
                    print(f"{scenario:22} {endpoint:12} {args.runs:5} {total.double_charges:15} "
                          f"{total.wrong_answers:14} {total.forbidden_resends:19}", flush=True)
                    for note in sorted(set(total.notes))[:3]:
                        print(f"    {note}")
        finally:
            api.kill()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
