"""Who is calling, and may they: the run and attempt of a request (its headers, its proxy
credentials, or those its connection's CONNECT carried), the run's token when durable_auth_secret
is set, which start of the agent a connection comes from, and the journal's own address, never a
destination."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import weakref

from mitmproxy import connection, http

from ..matching import identity
from ..steps.responses import Refused
from ..steps.settings import Settings
from ..store.journal import Journal
from . import journal_guard, peers

logger = logging.getLogger("durable")

WARNED_RUNS_MAX = 10_000


class Admission:
    def __init__(self) -> None:
        self.default_run = identity.mint_id("run")
        self.default_attempt = identity.mint_id("attempt")
        self.starts = peers.Starts()
        self.client_starts: weakref.WeakKeyDictionary[connection.Client, str | None] = weakref.WeakKeyDictionary()
        self.credentials: weakref.WeakKeyDictionary[connection.Client, identity.Credentials] = (
            weakref.WeakKeyDictionary()
        )
        self.warned_runs: set[str] = set()  # runs told once that their requests name no attempt

    async def trace_client(self, client: connection.Client, s: Settings) -> None:
        """Which start of the agent opened this connection (peers.py): looked up once per connection,
        off the event loop, on its first request (mitmproxy's client_connected hook must not await)."""
        if s.attempt_per_start and client not in self.client_starts:
            self.client_starts[client] = await asyncio.to_thread(
                peers.start_of_connection, client.peername, client.sockname
            )

    async def connect(self, flow: http.HTTPFlow, s: Settings, journal: Journal | None) -> None:
        """HTTPS: the run credentials arrive on CONNECT and hold for the whole client connection.
        With durable_auth_secret, a CONNECT without them is refused before anything is relayed:
        what follows a tunnel may not be HTTP at all (raw TCP), so it cannot be checked later.
        Raises identity.IdentityError or Refused."""
        creds = identity.parse_proxy_authorization(flow.request.headers.get(identity.PROXY_AUTH_HEADER))
        await refuse_the_journal(flow.request.host, flow.request.port, journal)
        if s.auth_secret:
            if not creds.run:
                raise Refused(407, "CONNECT needs the run's credentials RUN:ATTEMPT~TOKEN (durable_auth_secret is set)")
            authorize(s, creds.run, creds.token)
        self.credentials[flow.client_conn] = creds

    def identify(self, flow: http.HTTPFlow, s: Settings) -> identity.Identity:
        """Who is calling; takes the sidecar's own headers off the request on the way."""
        control, flow.request.headers.fields = identity.split_control(flow.request.headers.fields)
        try:
            creds = identity.parse_proxy_authorization(control.get("proxy-authorization"))
            if creds == identity.Credentials():
                creds = self.credentials.get(flow.client_conn, creds)
            ident = identity.resolve(control, creds, s.run, s.attempt, self.default_run, self.default_attempt)
        except identity.IdentityError as e:
            raise Refused(400, str(e)) from e
        start = self.client_starts.get(flow.client_conn) if s.attempt_per_start else None
        if start is not None:  # a second start of the agent under one attempt id is an attempt of its own
            ident = dataclasses.replace(ident, attempt=self.starts.attempt(ident.run, ident.attempt, start))
        if ident.attempt_source in ("options", "default") and ident.run not in self.warned_runs:
            self._warn_no_attempt(ident)
        if s.auth_secret:
            authorize(s, ident.run, control.get(identity.TOKEN_HEADER.lower()) or creds.token)
        return ident

    def _warn_no_attempt(self, ident: identity.Identity) -> None:
        if len(self.warned_runs) >= WARNED_RUNS_MAX:
            self.warned_runs.clear()
        self.warned_runs.add(ident.run)
        logger.warning(
            "durable: run %s: its requests name no attempt, so they share attempt %s (from %s) for as long as "
            "this sidecar runs; if the agent restarts meanwhile, its calls are recorded (and paid) again instead "
            "of replayed. Give each start of the agent its own attempt: http://RUN:ATTEMPT@proxy, a "
            "Durable-Attempt header, or `durable run`",
            ident.run,
            ident.attempt,
            "--set durable_attempt" if ident.attempt_source == "options" else "the proxy's start",
        )


def authorize(s: Settings, run: str, token: str | None) -> None:
    """With durable_auth_secret, a run is opened only by its token: no token, no journal, no upstream."""
    if not identity.token_ok(s.auth_secret, run, token):
        raise Refused(
            407,
            f"run {run!r} needs its token: proxy credentials RUN:ATTEMPT~TOKEN or a Durable-Token header "
            "(durable run computes it)",
            run=run,
        )


PROTECTED = (
    "protected mode: this sidecar has no durable_auth_secret, so it serves only clients on its own host's "
    "loopback; set durable_auth_secret (clients then need a run's token) or durable_allow_remote_clients=true"
)


def refuse_remote(client: connection.Client, s: Settings) -> None:
    """Protected mode (as Redis's): without a secret, anyone who reaches the port could replay any run's
    journaled answers by naming its run id, so only clients on loopback are served unless told otherwise."""
    if s.auth_secret or s.allow_remote_clients or client.peername is None:
        return
    if not journal_guard.loopback(str(client.peername[0])):
        raise Refused(403, PROTECTED)


def operator(request: http.Request, s: Settings) -> bool:
    """May this request see more of the sidecar than whether it is alive (its CA, its lease, a
    flush)? Always without durable_auth_secret; with it, only with some run's token: proxy
    credentials RUN:ATTEMPT~TOKEN, or the Durable-Run-Id and Durable-Token headers."""
    if not s.auth_secret:
        return True
    try:
        creds = identity.parse_proxy_authorization(request.headers.get(identity.PROXY_AUTH_HEADER))
    except identity.IdentityError:
        return False
    run = creds.run or request.headers.get(identity.RUN_HEADER)
    token = creds.token or request.headers.get(identity.TOKEN_HEADER)
    return run is not None and identity.token_ok(s.auth_secret, run, token)


async def refuse_the_journal(host: str, port: int, journal: Journal | None) -> None:
    """The journal's own PostgreSQL is never a target, however spelt (journal_guard.py)."""
    dsn = journal.target.dsn if journal is not None and journal.target is not None else None
    if await journal_guard.reaches(host, port, dsn):
        raise Refused(403, journal_guard.REASON)
