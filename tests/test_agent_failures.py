"""Exactly-once when the agent fails: hang-ups, retries after the sidecar's own 503, overlapping
attempts on one or two sidecars, a stale replay index, two sidecars racing to record one step.

Each scenario of scripts/agent_failures.py (which runs them 20 times for the README's table) runs
once here, against an upstream that honours Idempotency-Key and one that ignores it, with real
processes: agents SIGKILLed mid-call, PostgreSQL connections cut mid-call, mitmdump sidecars.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import agent_failures
from conftest import PaidApi


@pytest.mark.parametrize("endpoint", sorted(agent_failures.ENDPOINTS))
@pytest.mark.parametrize("scenario", list(agent_failures.SCENARIOS))
def test_no_second_charge_and_one_answer(
    scenario: str, endpoint: str, tmp_path: Path, https_api: PaidApi, pg_server: str, confdir: Path
) -> None:
    rig = agent_failures.Rig(tmp_path, https_api.url, https_api.ca, pg_server, confdir)
    result = agent_failures.run_once(rig, scenario, endpoint)
    assert (result.double_charges, result.wrong_answers, result.forbidden_resends) == (0, 0, 0), result.notes
