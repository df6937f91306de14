#!/usr/bin/env python3
"""No silent wrong answers (issue 36): each adversarial case N times, as a table.

Each case is a test with real processes (sidecars, agents, upstreams that bill every call and answer
by what they saw) that fails on any wrong answer, any double charge or a conversation left open:
  ws-stateful            a server keeping a running total per connection, resumed: never a total made
                         without the replayed messages (closed with 4410 by default; right with resend)
  ws-stateful-rpc        the same with JSON-RPC answers
  ws-answer-then-crash   an agent gets an answer with no end marker and is SIGKILLed: not paid again
  ws-refusal-closes      a refused message (in doubt under fail) closes the agent's connection within 5 s
  ws-server-gone         a resumed conversation whose server is gone closes within 5 s (4502)
  ws-close-replayed      a server's close reaches the agent live and again when replayed
  ws-64mib-answer        64 x 1 MiB answered to one message: all delivered, sidecar under 250 MB
  mcp-cart               a session the server still holds is kept: the live checkout sees the cart
  headers-<class>        two requests told apart only by a header, resumed in the other order
  rotated-credentials    a key rotated on restart still replays, no upstream call
  worker-outlives        a worker outliving its group's leader is the live attempt: no stale replay
  worker-setsid          a worker a live agent starts in a session of its own: the same
  waiter-hangs-up        a waiter on another sidecar whose agent hangs up gives its step back: paid once
  lost-pending-reply     one pooled connection loses the pending commit's reply: sent once, under fail
The table counts the runs whose test failed; the tests name what failed.

Usage: .venv/bin/python scripts/wrong_answers.py [--runs 5] [--only CASE]
(PostgreSQL: $DATABASE_URL if set, else the embedded one, as the tests.)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER_CLASSES = ["authorization", "x-tenant", "accept", "accept-language", "range", "if-none-match", "virtual-host",
                  "content-type-params", "multipart-part-headers"]
CASES = {
    "ws-stateful": "tests/test_websocket.py::test_a_stateful_server_never_answers_without_the_state_the_agent_believes_in[plain]",
    "ws-stateful-rpc": "tests/test_websocket.py::test_a_stateful_server_never_answers_without_the_state_the_agent_believes_in[json-rpc]",
    "ws-answer-then-crash": "tests/test_websocket.py::test_an_answer_with_no_end_marker_is_journaled_before_the_agent_has_it",
    "ws-refusal-closes": "tests/test_websocket.py::test_a_refused_message_closes_the_agents_connection_at_once_with_a_code_that_says_why",
    "ws-server-gone": "tests/test_websocket.py::test_a_resumed_conversation_whose_server_is_gone_is_closed_with_a_code_that_says_why",
    "ws-close-replayed": "tests/test_websocket.py::test_a_servers_close_reaches_the_agent_live_after_a_replay_and_again_when_replayed",
    "ws-64mib-answer": "tests/test_websocket.py::test_an_answer_past_the_body_cap_streams_through_in_bounded_memory_and_stays_in_doubt",
    "mcp-cart": "tests/test_mcp.py::test_a_replayed_session_the_server_still_holds_keeps_its_state",
    **{f"headers-{c}": f"tests/test_choice.py::test_requests_told_apart_only_by_headers_get_their_own_answers_in_any_order[{c}]"
       for c in HEADER_CLASSES},
    "rotated-credentials": "tests/test_choice.py::test_rotated_credentials_still_replay_with_no_upstream_call",
    "worker-outlives": "tests/test_starts.py::test_a_worker_of_a_live_attempt_is_that_attempt_not_a_second_start[outlives]",
    "worker-setsid": "tests/test_starts.py::test_a_worker_of_a_live_attempt_is_that_attempt_not_a_second_start[setsid]",
    "waiter-hangs-up": "tests/test_exactly_once.py::test_a_waiter_on_another_sidecar_whose_agent_hangs_up_gives_its_step_back",
    **{f"lost-pending-reply-{e}": f"tests/test_connection_failures.py::test_no_second_charge_no_lost_answer_no_stuck_step[one-reply-lost-{e}]"
       for e in ("honours-key", "ignores-key")},
}


def run_case(node: str, runs: int) -> tuple[int, int, float]:
    """(runs, failed runs, seconds): the test run `runs` times, each in a pytest of its own."""
    failed, started = 0, time.monotonic()
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as work:
            report = Path(work) / "junit.xml"
            subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", node],
                           cwd=ROOT, capture_output=True, text=True)
            cases = list(ET.parse(report).getroot().iter("testcase"))
            failed += not cases or any(c.find("failure") is not None or c.find("error") is not None for c in cases)
    return runs, failed, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", choices=sorted(CASES), action="append")
    args = parser.parse_args()
    print("| case | runs | failed | seconds |\n|---|---|---|---|", flush=True)
    for name in args.only or list(CASES):
        ran, failed, took = run_case(CASES[name], args.runs)
        print(f"| `{name}` | {ran} | {failed} | {took:.0f} |", flush=True)


if __name__ == "__main__":
    main()
