"""Identity parsing and precedence (pure logic)."""

from __future__ import annotations

import base64

import pytest

from durable_sidecar.matching import identity
from durable_sidecar.matching.identity import Credentials, IdentityError


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def resolve(headers=None, creds=Credentials(), run=None, attempt=None):
    return identity.resolve(headers or {}, creds, run, attempt, "run-default", "attempt-default")


def test_headers_win_over_everything() -> None:
    got = resolve({"durable-run-id": "h", "durable-attempt": "ha", "durable-step-key": "k1"}, Credentials("c", "ca"), "o", "oa")
    assert (got.run, got.attempt, got.step_key, got.source) == ("h", "ha", "k1", "header")


def test_proxy_credentials_then_options_then_defaults() -> None:
    got = resolve(creds=Credentials("c", "ca"), run="o", attempt="oa")
    assert (got.run, got.attempt, got.source) == ("c", "ca", "proxy-credentials")
    got = resolve(run="o", attempt="oa")
    assert (got.run, got.attempt, got.source) == ("o", "oa", "options")
    got = resolve()
    assert (got.run, got.attempt, got.source) == ("run-default", "attempt-default", "default")


def test_run_and_attempt_each_take_their_first_source() -> None:
    got = resolve({"durable-run-id": "h"}, Credentials("c", "ca"))
    assert (got.run, got.attempt) == ("h", "ca")
    got = resolve(creds=Credentials("c", None), attempt="oa")
    assert (got.run, got.attempt) == ("c", "oa")


def test_proxy_authorization_parsing() -> None:
    assert identity.parse_proxy_authorization(basic("run-1", "2")) == Credentials("run-1", "2")
    assert identity.parse_proxy_authorization(basic("agent@host", "")) == Credentials("agent@host", None)
    assert identity.parse_proxy_authorization(None) == Credentials()
    with pytest.raises(IdentityError):
        identity.parse_proxy_authorization("Bearer abc")
    with pytest.raises(IdentityError):
        identity.parse_proxy_authorization(basic("bad run", "1"))


@pytest.mark.parametrize("bad", ["", "a b", "x" * 129, "a/b", "é", "a;b", "a\nb"])
def test_bad_ids_are_refused(bad: str) -> None:
    with pytest.raises(IdentityError):
        identity.validate_id(bad, "run id")


@pytest.mark.parametrize("good", ["r", "x" * 128, "agent.v2:task-1@host_A"])
def test_good_ids_pass(good: str) -> None:
    assert identity.validate_id(good, "run id") == good


def test_bad_step_key_is_refused() -> None:
    with pytest.raises(IdentityError, match="step key"):
        resolve({"durable-step-key": "no spaces please"})


def test_control_headers_are_split_off() -> None:
    fields = ((b"Durable-Run-Id", b"r"), (b"Authorization", b"Bearer k"), (b"durable-attempt", b"a"),
              (b"Proxy-Authorization", b"Basic x"), (b"X-Durable", b"1"))
    control, kept = identity.split_control(fields)
    assert control == {"durable-run-id": "r", "durable-attempt": "a", "proxy-authorization": "Basic x"}
    assert kept == ((b"Authorization", b"Bearer k"), (b"X-Durable", b"1"))
    untouched = ((b"Accept", b"*/*"),)
    assert identity.split_control(untouched) == ({}, untouched)


def test_minted_ids_are_valid_and_distinct() -> None:
    a, b = identity.mint_id("run"), identity.mint_id("run")
    assert a != b and identity.validate_id(a, "run id")


def test_a_connection_is_traced_to_its_process_group_and_leader_start() -> None:
    """peers.py on real sockets of this process, IPv4 and IPv6: the agent's socket is found by its
    address, its owner is this process, and its start names this process group and its leader."""
    import os
    import socket

    from durable_sidecar.proxy import peers

    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.create_server((host, 0), family=family) as server:
            client = socket.create_connection(server.getsockname()[:2])
            accepted, _ = server.accept()
            with client, accepted:
                inode = peers.socket_inode(accepted.getpeername(), accepted.getsockname())
                assert inode == os.fstat(client.fileno()).st_ino
                assert peers.owner(inode) == os.getpid()
                start = peers.start_of_connection(accepted.getpeername(), accepted.getsockname())
                assert start is not None and start.split(".")[0] == str(os.getpgrp())


def test_an_attempt_id_is_bound_to_its_first_start() -> None:
    from durable_sidecar.proxy.peers import Starts

    starts = Starts()
    assert starts.attempt("r", "a1", "100.5") == "a1"
    assert starts.attempt("r", "a1", "100.5") == "a1"  # the same start: many processes, one attempt
    second = starts.attempt("r", "a1", "200.9")
    assert second.startswith("a1@") and second == starts.attempt("r", "a1", "200.9")
    assert starts.attempt("other-run", "a1", "200.9") == "a1"  # per run
