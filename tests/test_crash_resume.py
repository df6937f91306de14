"""An unmodified agent (openai SDK streamed and not, requests, httpx) crashes and resumes through a
real mitmdump sidecar in front of an HTTPS upstream that bills every call."""

from __future__ import annotations

from pathlib import Path

from conftest import PaidApi, Sidecars, new_run, run_agent, sql

STEPS = 4
CALLS = STEPS * 3  # llm, search, payment per step


def outcomes(calls: list[dict]) -> list[str]:
    return [c["outcome"] for c in calls]


def results(calls: list[dict]) -> list[tuple]:
    return [(c["step"], c["call"], c["result"]) for c in calls]


def test_uninterrupted_run_bills_each_call_once(sidecars: Sidecars, ca_bundle: Path, https_api: PaidApi) -> None:
    sidecar = sidecars.start()
    code, calls = run_agent(sidecar, ca_bundle, https_api, new_run(), "a1", steps=STEPS)
    assert code == 0
    assert outcomes(calls) == ["recorded"] * CALLS
    assert [int(c["seq"]) for c in calls] == list(range(1, CALLS + 1))
    books = https_api.books()
    assert (books["calls"], books["charges"]) == (CALLS, CALLS)


def test_crash_then_resume_replays_completed_calls(
    sidecars: Sidecars, ca_bundle: Path, https_api: PaidApi, pg_dsn: str
) -> None:
    sidecar = sidecars.start()
    reference_run = new_run()
    _, reference = run_agent(sidecar, ca_bundle, https_api, reference_run, "only", steps=STEPS)
    https_api.reset()

    run = new_run()
    code, first = run_agent(sidecar, ca_bundle, https_api, run, "a1", steps=STEPS, crash_after=5)
    assert code == -9  # SIGKILL, mid step 2
    assert outcomes(first) == ["recorded"] * 5
    assert https_api.books()["charges"] == 5

    code, second = run_agent(sidecar, ca_bundle, https_api, run, "a2", steps=STEPS)
    assert code == 0
    assert outcomes(second) == ["replayed"] * 5 + ["recorded"] * (CALLS - 5)
    assert results(second[:5]) == results(first)  # the steps before the crash come back identical
    assert results(second) == results(reference)  # and the run ends as an uninterrupted one would
    books = https_api.books()
    assert (books["calls"], books["charges"]) == (CALLS, CALLS)  # not CALLS + 5
    rows = sql(pg_dsn, "SELECT count(*), count(*) FILTER (WHERE state = 'completed') FROM durable_steps WHERE run_id = %s", run)
    assert rows == [(CALLS, CALLS)]


def test_sidecar_killed_and_restarted_between_attempts(
    sidecars: Sidecars, ca_bundle: Path, https_api: PaidApi
) -> None:
    run = new_run()
    first_sidecar = sidecars.start()
    _, first = run_agent(first_sidecar, ca_bundle, https_api, run, "a1", steps=STEPS, crash_after=7)
    first_sidecar.kill()  # the whole box went down, not only the agent

    second_sidecar = sidecars.start()
    code, second = run_agent(second_sidecar, ca_bundle, https_api, run, "a2", steps=STEPS)
    assert code == 0
    assert outcomes(second)[:7] == ["replayed"] * 7
    assert results(second[:7]) == results(first)
    assert https_api.books()["charges"] == CALLS


def test_full_replay_with_the_upstream_down(
    sidecars: Sidecars, ca_bundle: Path, tmp_path: Path
) -> None:
    api = PaidApi(tmp_path, tls=True)
    sidecar = sidecars.start(ssl_verify_upstream_trusted_ca=str(api.ca))
    run = new_run()
    try:
        _, first = run_agent(sidecar, ca_bundle, api, run, "a1", steps=2)
    finally:
        api.stop()
    code, second = run_agent(sidecar, ca_bundle, api, run, "a2", steps=2)  # nothing listens upstream now
    assert code == 0
    assert outcomes(second) == ["replayed"] * 6
    assert results(second) == results(first)
