"""A wrong option never turns journaling off: the sidecar refuses to start (one line, exit 2), a bad
value set while it runs is refused with the old configuration kept, `durable run` starts no agent
without a serving sidecar, and requests that name no attempt are warned about once per run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from durable_sidecar.steps import settings
from durable_sidecar.proxy.sidecar import DurableSidecar
from conftest import PaidApi, Sidecars, new_run

DURABLE = str(Path(sys.executable).with_name("durable"))


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("durable_strict", "yes-please", "durable_strict"),
        ("durable_body_cap", "abc", "durable_body_cap"),
        ("durable_in_doubt", "maybe", "maybe"),
        ("durable_in_doubt_window", "soon", "soon"),
        ("durable_strictt", "true", "unknown option durable_strictt"),
        ("durable_encryption_key", "k1:not-base64", "encryption key 'k1'"),
        ("durable_ws_resume", "replay", "durable_ws_resume"),
        ("durable_allow_remote_clients", "maybe", "durable_allow_remote_clients"),
    ],
)
def test_a_bad_option_stops_the_sidecar_at_start(sidecars: Sidecars, option: str, value: str, said: str) -> None:
    with pytest.raises(RuntimeError) as failure:
        sidecars.start(**{option: value})
    assert "exited with 2" in str(failure.value)
    reasons = [line for line in str(failure.value).splitlines() if line.startswith("durable: configuration error")]
    assert len(reasons) == 1 and said in reasons[0]


def test_a_bad_value_set_while_running_is_refused_and_the_old_configuration_kept() -> None:
    addon = DurableSidecar()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, durable_dsn="postgresql://unused", durable_in_doubt=["api.example.com=fail"])
        lifecycle = addon.lifecycle
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(addon, durable_in_doubt=["maybe"])
        assert addon.lifecycle is lifecycle and addon.settings.in_doubt_policy("api.example.com") == "fail"
        assert tctx.options.durable_in_doubt == ["api.example.com=fail"]


def test_durable_run_does_not_start_the_agent_without_a_serving_sidecar(tmp_path: Path, pg_dsn: str) -> None:
    witness = tmp_path / "agent-ran"
    out = subprocess.run(
        [DURABLE, "run", "--run", new_run(), "--dsn", pg_dsn, "--confdir", str(tmp_path / "conf"),
         "--set", "durable_in_doubt=maybe", "--", "touch", str(witness)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0 and not witness.exists()
    assert "agent was not started" in out.stderr and "maybe" in out.stderr


def test_in_doubt_policy_per_host() -> None:
    policies = settings.per_host(["reissue", "api.openai.com=fail"], "reissue", "durable_in_doubt",
                                 settings.IN_DOUBT_POLICIES)
    assert policies == {None: "reissue", "api.openai.com": "fail"}
    with pytest.raises(ValueError, match="perhaps"):
        settings.per_host(["api.openai.com=perhaps"], "reissue", "durable_in_doubt", settings.IN_DOUBT_POLICIES)


def test_requests_without_an_attempt_are_warned_about_once_per_run(sidecars: Sidecars, http_api: PaidApi) -> None:
    sidecar = sidecars.start()
    bare, named = new_run(), new_run()
    for run, password in ((bare, ""), (bare, ""), (named, ":a1")):  # curl sends a user name alone (requests drops it)
        out = subprocess.run(["curl", "-sf", "-x", f"http://{run}{password}@127.0.0.1:{sidecar.port}",
                              f"{http_api.url}/v1/search?q={run}"], capture_output=True, timeout=30)
        assert out.returncode == 0
    warnings = [line for line in sidecar.log().splitlines() if "name no attempt" in line]
    assert len(warnings) == 1 and bare in warnings[0] and "recorded (and paid) again" in warnings[0]


def test_a_malformed_key_in_the_environment_stops_the_sidecar_at_start(sidecars: Sidecars) -> None:
    """DURABLE_ENCRYPTION_KEY is read where the options are: a malformed one is a configuration
    error (one line, exit 2), not an addon that fails to load, nor a sidecar answering 503s."""
    import os

    with pytest.raises(RuntimeError) as failure:
        sidecars.start(env={**os.environ, "DURABLE_ENCRYPTION_KEY": "k1:abc"})
    assert "exited with 2" in str(failure.value)
    reasons = [line for line in str(failure.value).splitlines() if line.startswith("durable: configuration error")]
    assert len(reasons) == 1 and "encryption key 'k1'" in reasons[0]



def test_an_otlp_protocol_the_sidecar_does_not_speak_stops_it_at_start(sidecars: Sidecars) -> None:
    """OTEL_EXPORTER_OTLP_PROTOCOL=grpc with an endpoint: the sidecar speaks http/protobuf only, and
    says so at start instead of exporting to a port that does not understand it."""
    import os

    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    with pytest.raises(RuntimeError) as failure:
        sidecars.start(env=env)
    assert "exited with 2" in str(failure.value) and "http/protobuf only" in str(failure.value)
