"""The durable sidecar addon: mitmproxy's hooks, conducting identity, streams and the step life cycle.

Each hook is short: it finds out who is calling (identity), hands the step to the life cycle
(journal first, forward second), decides whether the answer streams, and stamps the outcome on what
the agent receives. Whatever fails, the agent gets an error response: mitmproxy would forward a
flow whose hook raised, so every path catches and answers (fail closed).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import Any

from mitmproxy import ctx, exceptions, http
from mitmproxy import flow as mflow

from ..matching import identity, redaction
from ..steps import responses, settings, streams
from ..steps.lifecycle import AnswerHeld, Lifecycle, Step
from ..steps.pacing import Pacer
from ..steps.responses import Refused
from ..store import crypto, database, registry
from ..store.journal import Journal, JournalError, SealedError
from . import (
    admission,
    conversations,
    dispatch,
    endpoints,
    httplayer,
    journal_guard,
    quietlog,
    reporting,
    sessions,
    tracing,
    upstream_ws,
    ws_batch,
    ws_close,
)
from .metrics import Metrics

logger = logging.getLogger("durable")

META = "durable"
CONVERSATION = "durable-conversation"  # a WebSocket's Conversation (conversations.py)
SESSION = "durable-session"  # (replayed token, live token) of a request of a reopened upstream session
HANDSHAKE = "durable-handshake"  # a WebSocket handshake's identity and replayed greeting, for websocket_start


def journal_options(s: settings.Settings) -> tuple[object, ...]:
    """What the journal is opened with: a change of these opens a new one (and forgets replay positions)."""
    return s.dsn, s.db_timeout_s, s.encryption_key


class DurableSidecar:
    """The addon: mitmproxy's hooks, each short, handing off to admission.py (who is calling),
    endpoints.py (what the sidecar answers itself), the step life cycle (steps/), conversations.py
    (WebSockets), sessions.py and reporting.py. Over 300 lines because mitmproxy wants its hooks
    on one object, and configure/running wire the pieces together once."""

    def __init__(self) -> None:
        self.lifecycle: Lifecycle | None = None
        self.metrics: Metrics | None = None
        self.draining = False  # stopping: new calls are refused while those in flight finish
        self._housekeeper: asyncio.Future[None] | None = None
        self.settings: settings.Settings = settings.DEFAULTS
        self.admission = admission.Admission()
        self.reporter = reporting.Reporter(self._url)
        self.sessions = sessions.Sessions()
        self.services = registry.Ports()  # durable ui's ports on this host
        self.orphans_finished = 0  # calls finished and journaled after their agent hung up

    # -- mitmproxy life cycle ---------------------------------------------------------------

    def load(self, loader: Any) -> None:
        for name, typespec, default, help_text in settings.OPTIONS:
            loader.add_option(name, typespec, default, help_text)
        apply_deferred(loader.master.options)
        quietlog.quiet("psycopg.pool")  # a reconnect error per second while the journal is down: once per 30 s
        for missing in httplayer.install():
            logger.warning("durable: this mitmproxy's HTTP layer is not the one expected: %s", missing)
        if not upstream_ws.install():
            logger.warning(
                "durable: this mitmproxy's WebSocket layer is not the one expected: pings go unanswered "
                "while a conversation is replayed"
            )
        if not ws_close.install():
            logger.warning(
                "durable: this mitmproxy's WebSocket layer is not the one expected: a refused conversation "
                "stays open until the agent gives up"
            )
        if not ws_batch.install():
            logger.warning(
                "durable: this mitmproxy's WebSocket layer is not the one expected: server messages that "
                "must be journaled first may reach the agent before their commit"
            )
        if not dispatch.install():
            logger.info("durable: mitmproxy's own hook dispatch in use (this version's is not the one expected)")

    def configure(self, updated: set[str]) -> None:
        if "termlog_verbosity" in updated or self.lifecycle is None:
            self.reporter.lines = reporting.lines_shown()
        if self.lifecycle is not None and not any(name.startswith("durable_") for name in updated):
            return
        try:
            new = settings.from_options(ctx.options)
        except exceptions.OptionsError as e:
            if self.lifecycle is None:
                fatal(str(e))
            raise  # while running, mitmproxy refuses the new value and keeps the old configuration
        old = self.lifecycle.settings if self.lifecycle else None
        redactor = redaction.Redactor(
            redaction.load_key(new.redact_key, database.durable_home()), new.redact_headers, new.redact_json
        )
        if old is None or journal_options(new) != journal_options(old):
            journal = Journal(new.dsn, timeout_s=new.db_timeout_s, keyring=crypto.Keyring(new.encryption_key))
            lifecycle = self.lifecycle = Lifecycle(journal, new, redactor)
        else:  # keep the journal and every attempt's replay position
            assert self.lifecycle is not None  # configured before (old is set)
            lifecycle = self.lifecycle
            lifecycle.settings, lifecycle.redactor = new, redactor
            lifecycle.positions.read_ahead.limit = new.read_ahead_bytes
        self.settings = new
        self.reporter.json = new.log_json
        lifecycle.journal.offload_bytes = new.offload_bytes
        httplayer.ORPHANS.timeout_s = new.orphan_timeout_s
        httplayer.ORPHANS.on_expired = self._orphan_expired
        httplayer.ORPHANS.on_adopted = self._orphan_adopted
        if new.metrics_listen and self.metrics is None:
            self.metrics = self.reporter.metrics = Metrics()
        if tracing.wanted(new.otlp_endpoint) and self.reporter.tracing is None:
            self._start_tracing(new.otlp_endpoint, first=old is None)
        if self.reporter.tracing is not None:
            self.reporter.tracing.redact = redactor.body
            if self.reporter.tracing.contents and new.encryption_key:
                self.reporter.tracing.contents = False
                logger.warning("durable: the journal is encrypted at rest: message contents are not exported in spans")
        if new.replay_pacing and lifecycle.pacer is None:
            lifecycle.pacer = Pacer()
        if self.metrics is not None:
            lifecycle.journal.observe = self.reporter.observe_journal
            lifecycle.journal.on_commit = self.metrics.commit_writes.observe
            lifecycle.on_divergence = self.metrics.divergences.inc

    def _start_tracing(self, endpoint: str, first: bool) -> None:
        """A span per step over OTLP/HTTP (tracing.py); the SDK is an extra: without it, one warning."""
        try:
            self.reporter.tracing = tracing.Tracing(endpoint, self.reporter.spans_dropped)
        except ImportError:
            logger.warning(
                "durable: an OTLP endpoint is set but the OpenTelemetry SDK is not installed "
                "(pip install 'durable-sidecar[otel]'): no spans are exported"
            )
        except ValueError as e:
            if first:
                fatal(str(e))
            raise exceptions.OptionsError(str(e)) from e
        else:
            logger.info("durable: a span per step exported over OTLP/HTTP (%s)", tracing.describe(endpoint))

    async def running(self) -> None:
        if ctx.options.rawtcp != self.settings.raw_tcp:
            # bytes that are not HTTP cannot be journaled: they are relayed only when asked for
            ctx.options.update(rawtcp=self.settings.raw_tcp)
        if ctx.options.connection_strategy != "lazy":
            # replay must not need the upstream: no eager connection at CONNECT time
            ctx.options.update(connection_strategy="lazy")
        if not self.settings.log_secrets and ctx.options.flow_detail:
            # mitmproxy's flow dump prints URLs, headers and bodies with the agent's credentials
            ctx.options.update(flow_detail=0)
            logger.info(
                "durable: mitmproxy's flow dump is off (it prints credentials); one redacted line per flow "
                "replaces it (--set durable_log_secrets=true keeps it)"
            )
        if not self.settings.auth_secret and not self.settings.allow_remote_clients:
            if not journal_guard.loopback(ctx.options.listen_host or "0.0.0.0"):  # "": every interface
                logger.warning("durable: listening beyond loopback in %s", admission.PROTECTED)
        logger.info(
            "durable: runs without an id go to run %s, attempt %s",
            self.settings.run or self.admission.default_run,  # durable_run / durable_attempt when given
            self.settings.attempt or self.admission.default_attempt,
        )
        assert self.lifecycle is not None
        try:
            await self.lifecycle.journal.open()
        except Exception as e:
            logger.warning("durable: journal not reachable yet (%s); answering 503 until it is", e)
        if self.lifecycle.pacer is not None and self.lifecycle.pacer.port is None:
            await self.lifecycle.pacer.start()
        if self.metrics is not None and self.settings.metrics_listen:
            read_ahead, repairs = self.lifecycle.positions.read_ahead, self.lifecycle.repairs
            self.metrics.serve(
                self.settings.metrics_listen,
                lambda: reporting.in_doubt_steps(self.lifecycle.journal if self.lifecycle else None),
                lambda: float(read_ahead.used),
                lambda: float(len(repairs.held)),
            )
        if self._housekeeper is None:
            self._housekeeper = asyncio.ensure_future(self._housekeeping())

    # -- hooks ----------------------------------------------------------------------------------

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        """HTTPS: the run's credentials arrive on CONNECT (admission.py); refused, nothing is relayed."""
        try:
            admission.refuse_remote(flow.client_conn, self.settings)
            await self.admission.connect(flow, self.settings, self._journal())
        except identity.IdentityError as e:
            logger.warning("durable: CONNECT refused: %s", e)
            flow.response = responses.refusal(400, str(e))
        except Refused as e:
            logger.warning("durable: CONNECT refused: %s", e.reason)
            flow.response = responses.refusal(e.status, e.reason, **e.details)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Bodies over the cap are never buffered: refused before anything is sent, or passed
        through; either way only after the caller is known and, with durable_auth_secret, allowed."""
        length = streams.declared_length(flow.request.headers)
        cap = self.settings.body_cap
        if length is None:
            flow.metadata[httplayer.CAP_KEY] = cap  # counted as it arrives (httplayer.py)
        if length is None or length <= cap or flow.response is not None or endpoints.addressed(flow.request):
            return
        try:
            ident = self.admission.identify(
                flow, self.settings
            )  # checks the run's token; takes the control headers off
        except Refused as e:
            self._refuse(flow, e.status, e.reason, **e.details)
            flow.metadata[httplayer.DRAIN_KEY] = True
            return
        reason = f"request body of {length} bytes is over durable_body_cap ({cap})"
        if self.settings.oversize_request == "refuse":
            self._refuse(flow, 413, reason + "; nothing was forwarded", run=ident.run, attempt=ident.attempt)
            flow.metadata[httplayer.DRAIN_KEY] = True
            return
        logger.warning(
            "durable: run=%s attempt=%s %s %s passes through unjournaled: %s",
            ident.run,
            ident.attempt,
            flow.request.method,
            self._url(flow),
            reason,
        )
        flow.request.stream = True
        flow.metadata[META] = Step(ident.run, None, "passthrough", ident.attempt)
        httplayer.label(flow.request, responses.labels(ident.run, None, "passthrough"))

    async def server_connect(self, data: Any) -> None:
        """Every connection mitmproxy is about to open (tunnels, raw TCP, transparent mode): never one
        to the journal's own database (journal_guard.py); killed before it is opened."""
        host, port = data.server.address or ("", 0)
        try:
            admission.refuse_remote(data.client, self.settings)
            await admission.refuse_the_journal(str(host), int(port), self._journal())
        except Refused as e:
            logger.warning("durable: connection to %s:%s refused: %s", host, port, e.reason)
            data.server.error = e.reason

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.is_replay or META in flow.metadata:
            return
        try:
            admission.refuse_remote(flow.client_conn, self.settings)
        except Refused as e:
            self._refuse(flow, e.status, e.reason)
            return
        if endpoints.addressed(flow.request):
            assert self.lifecycle is not None
            operator = admission.operator(flow.request, self.settings)
            await endpoints.answer(flow, self.lifecycle, self.draining, operator)
            outcome = "passthrough" if flow.response and flow.response.status_code < 300 else "refused"
            flow.metadata[META] = Step(None, None, outcome)
            return
        known: dict[str, str] = {}  # the run and attempt, once identified: every refusal names them
        try:
            await self.admission.trace_client(flow.client_conn, self.settings)
            await admission.refuse_the_journal(flow.request.host, flow.request.port, self._journal())
            ident = self.admission.identify(flow, self.settings)
            known = {"run": ident.run, "attempt": ident.attempt}
            if self.draining:
                raise Refused(503, "the sidecar is stopping (draining its calls in flight): nothing was forwarded")
            own = self._own(flow.request)
            if own or self.settings.ignored(flow.request.host, flow.request.path) or mcp_notifications(flow.request):
                if self.settings.offline and not own:
                    raise Refused(404, "passes through unjournaled, so it is not in the recording (durable_offline)")
                step = Step(ident.run, None, "passthrough", ident.attempt)
            else:
                assert self.lifecycle is not None
                step = await self.lifecycle.begin(flow, ident)
                step.session = "mcp-session-id" in flow.request.headers
                if conversations.is_upgrade(flow.request):
                    greeting: list[conversations.Frame] = []
                    if flow.response is not None:
                        greeting = conversations.replayed_handshake(flow)
                    flow.metadata[HANDSHAKE] = (ident, greeting)
            if step.outcome == "replayed":
                self.sessions.replayed(ident.run, flow)
            elif mapped := await self.sessions.outgoing(ident.run, flow.request):  # live, or passed through
                flow.metadata[SESSION] = mapped
            flow.metadata[META] = step
            if step.live:  # should the agent hang up now, the sidecar finishes the call (httplayer.py)
                flow.metadata[httplayer.ORPHAN_KEY] = True
            # should mitmproxy answer an error itself (the upstream unreachable), it carries these too
            httplayer.label(flow.request, responses.labels(step.run, step.seq, step.outcome))
        except Refused as e:
            self._refuse(flow, e.status, e.reason, **{**known, **e.details})
        except SealedError as e:
            self._refuse(
                flow,
                503,
                "journaled answer cannot be decrypted (give the sidecar its key with"
                " durable_encryption_key): nothing was forwarded",
                failed=str(e),
                **known,
            )
        except JournalError as e:
            self._refuse(flow, 503, "journal unavailable: nothing was forwarded", failed=str(e), **known)
        except Exception as e:
            logger.exception("durable: internal error")
            self._refuse(flow, 503, "sidecar error: nothing was forwarded", failed=f"{type(e).__name__}: {e}", **known)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Event streams, bodies of unknown length and bodies over the cap reach the agent live."""
        if SESSION in flow.metadata and flow.response is not None:
            sessions.Sessions.incoming(flow.response, flow.metadata[SESSION])
        step: Step | None = flow.metadata.get(META)
        if step is None or flow.response is None:
            return
        if step.paced:  # the pacer's chunks go to the agent as they come
            flow.response.stream = True
            responses.label(flow.response, step.run, step.seq, step.outcome)
            return
        upgraded = flow.response.status_code == 101  # no body follows; a WebSocket's messages are steps
        if step.live and not upgraded and streams.streams(flow.response.headers, self.settings.body_cap):
            step.tee = streams.StreamTee(self.settings.body_cap, streams.rpc_id(flow.request))
            flow.response.stream = step.tee
            flow.metadata[httplayer.COMPLETE_KEY] = step.tee.complete
            length = streams.declared_length(flow.response.headers)
            if length is not None and length > self.settings.body_cap:
                step.outcome = "passthrough"  # it will not be journaled: the label must not say recorded
            responses.label(flow.response, step.run, step.seq, step.outcome)  # the headers leave now

    async def response(self, flow: http.HTTPFlow) -> None:
        step: Step | None = flow.metadata.get(META)
        if step is None or flow.response is None:
            return
        if step.live and flow.websocket is not None:  # journaled with its greeting (websocket_start)
            httplayer.ORPHANS.done(flow)
        elif step.live:
            try:
                assert self.lifecycle is not None
                await self.lifecycle.finish(flow, step)
                if getattr(flow.request, httplayer.ORPHANED, False):
                    self.orphans_finished += 1
                    if self.metrics is not None:
                        self.metrics.orphans.inc()
                    logger.info(
                        "durable: run=%s seq=%s the agent hung up mid-call; the sidecar finished the call "
                        "and journaled its answer (orphan #%d)",
                        step.run,
                        step.seq,
                        self.orphans_finished,
                    )
            except Exception as e:
                logger.error("durable: run=%s seq=%s response not journaled: %s", step.run, step.seq, e)
                step.outcome = "refused"  # the step is given back: the agent's retry re-sends it
                if step.tee is not None:
                    flow.kill()  # already streamed: withhold the end so the agent sees the stream cut short
                    return
                reason = (
                    "the upstream answered but the journal could not record it yet: the sidecar holds the "
                    "answer and journals it once the journal is back; retry, it is answered from there, not re-sent"
                    if isinstance(e, AnswerHeld)
                    else "the upstream answered but the journal could not record it; the step stays in doubt "
                    "and the next attempt re-sends it with its original idempotency key"
                )
                flow.response = responses.refusal(503, reason, run=step.run, step=step.seq, failed=str(e))
            finally:
                httplayer.ORPHANS.done(flow)
        responses.label(flow.response, step.run, step.seq, step.outcome)
        self._log(flow, step, flow.response.status_code)

    async def error(self, flow: http.HTTPFlow) -> None:
        step: Step | None = flow.metadata.get(META)
        if step is None or not step.live:
            return
        message = flow.error.msg if flow.error else "unknown error"
        assert self.lifecycle is not None
        try:
            await self.lifecycle.break_off(flow, step, message)
        finally:
            httplayer.ORPHANS.done(flow)
        self._log(flow, step, None, note=message)

    async def websocket_start(self, flow: http.HTTPFlow) -> None:
        step: Step | None = flow.metadata.get(META)
        if step is None or step.seq is None or HANDSHAKE not in flow.metadata or self.lifecycle is None:
            return  # passed through (an ignored host) or refused
        ident, greeting = flow.metadata.pop(HANDSHAKE)
        flow.metadata[CONVERSATION] = conversations.Conversation(
            flow, ident, self.lifecycle, inject, ws_close.close, self._report, step if step.live else None, greeting
        )

    async def websocket_message(self, flow: http.HTTPFlow) -> None:
        conversation: conversations.Conversation | None = flow.metadata.get(CONVERSATION)
        assert flow.websocket is not None
        message = flow.websocket.messages[-1]
        del flow.websocket.messages[:-1]  # mitmproxy keeps every message of a connection: memory grows with it
        if conversation is None or message.injected:
            return
        if message.from_client:
            await conversation.client_message(message)
        else:
            await conversation.server_message(message)

    async def durable_websocket_commit(self, flow: http.HTTPFlow) -> None:
        """A read's server messages that must be journaled before delivery (ws_batch.py): one commit."""
        conversation: conversations.Conversation | None = flow.metadata.get(CONVERSATION)
        if conversation is not None:
            await conversation.commit()

    async def websocket_end(self, flow: http.HTTPFlow) -> None:
        conversation: conversations.Conversation | None = flow.metadata.pop(CONVERSATION, None)
        if conversation is not None:
            await conversation.ended()

    def _report(self, flow: http.HTTPFlow, step: Step) -> None:
        self._log(flow, step, flow.response.status_code if flow.response else None)

    def _orphan_adopted(self, flow: mflow.Flow) -> None:
        """The agent hung up mid-call (an SDK's timeout): its retry in this attempt is the same step,
        which waits for the orphan's answer instead of going upstream a second time."""
        step: Step | None = flow.metadata.get(META)
        if step is not None and step.live and self.lifecycle is not None:
            self.lifecycle.give_back(step)

    def _orphan_expired(self, flow: mflow.Flow) -> None:
        """An orphan ran past durable_orphan_timeout: mitmproxy drops its exchange; the step stays in doubt."""
        step: Step | None = flow.metadata.get(META)
        if isinstance(flow, http.HTTPFlow) and step is not None and step.live and self.lifecycle is not None:
            logger.warning(
                "durable: run=%s seq=%s orphan still unanswered after durable_orphan_timeout: left in doubt",
                step.run,
                step.seq,
            )
            asyncio.ensure_future(self.lifecycle.break_off(flow, step, "orphan timed out"))

    async def done(self) -> None:
        """A polite stop (SIGTERM, SIGINT) drains: new calls are refused, the calls in flight (orphans
        and held answers included) finish and are journaled, up to durable_drain_timeout; then the
        replay counts still gathering are written (`durable run`'s summary reads them)."""
        if self.lifecycle is None:
            return
        self.draining = True
        in_flight = self.lifecycle.in_flight
        if len(in_flight):
            logger.info("durable: stopping: draining %d calls in flight", len(in_flight))
            deadline = time.monotonic() + self.settings.drain_timeout_s
            while len(in_flight) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if len(in_flight):
                logger.warning(
                    "durable: stopping with %d calls still in flight after durable_drain_timeout: left in doubt",
                    len(in_flight),
                )
            else:
                logger.info("durable: drained: every call in flight was journaled")
        await self.lifecycle.journal.flush_replays()
        if self.reporter.tracing is not None:
            await asyncio.to_thread(self.reporter.tracing.close)

    async def _housekeeping(self, every_s: float = 600) -> None:
        """Neither the journal nor the sidecar's memory grows without bound: every 10 minutes, delete
        runs idle past the retention (small batches) and forget long-idle attempts' cursors."""
        while True:
            assert self.lifecycle is not None
            forgotten = self.lifecycle.positions.forget_idle(self.settings.attempt_idle_s)
            if forgotten:
                logger.info("durable: forgot the replay position of %d idle attempts", forgotten)
            if self.settings.retention_s:
                try:
                    deleted = await self.lifecycle.journal.gc(self.settings.retention_s)
                    if deleted:
                        logger.info(
                            "durable: retention: deleted %d runs idle for more than %ss",
                            deleted,
                            self.settings.retention_s,
                        )
                except JournalError as e:
                    logger.warning("durable: retention pass failed: %s", e)
            await asyncio.sleep(every_s)

    # -- helpers --------------------------------------------------------------------------------

    def _refuse(self, flow: http.HTTPFlow, status: int, reason: str, **details: Any) -> None:
        logger.warning(
            "durable: refused run=%s attempt=%s %s %s (%d): %s %s",
            details.get("run"),
            details.get("attempt"),
            flow.request.method,
            self._url(flow),
            status,
            reason,
            details.get("failed", ""),
        )
        flow.response = responses.refusal(status, reason, **details)
        flow.metadata[META] = Step(details.get("run"), details.get("step"), "refused", details.get("attempt"))

    def _own(self, request: http.Request) -> bool:
        """A call to this sidecar itself (its proxy or metrics port on this host) or to a `durable ui`
        running here (store/registry.py): never a step."""
        ports = {ctx.options.listen_port or 8080, *self.services.now()}
        if self.settings.metrics_listen:
            ports.add(int(self.settings.metrics_listen.rsplit(":", 1)[1]))
        return request.port in ports and journal_guard.this_host(request.host)

    def _journal(self) -> Journal | None:
        return self.lifecycle.journal if self.lifecycle else None

    def _url(self, flow: http.HTTPFlow) -> str:
        """The request's URL as it may be logged: credential-looking query parameters hashed."""
        assert self.lifecycle is not None
        return self.lifecycle.redactor.url(flow.request.pretty_url)

    def _log(self, flow: http.HTTPFlow, step: Step, status: int | None, note: str = "") -> None:
        """One line per flow (JSON with durable_log_json); the URL redacted, never a secret."""
        self.reporter.log(flow, step, status, note)


def inject(flow: http.HTTPFlow, content: bytes, text: bool) -> None:
    """A server message to the agent, from the journal or the sidecar's own upstream connection."""
    ctx.master.commands.call("inject.websocket", flow, True, content, text)


def mcp_notifications(request: http.Request) -> bool:
    """MCP's long-lived GET stream of a session's server notifications: not a call, not a step."""
    return (
        request.method == "GET"
        and "mcp-session-id" in request.headers
        and "text/event-stream" in request.headers.get("accept", "")
    )


def apply_deferred(options: Any) -> None:
    """`--set durable_*` values given before the addon declared its options are applied here, so a
    misspelt name or a malformed value stops the sidecar instead of being dropped with the addon
    (mitmproxy would then run without it: every call forwarded unjournaled)."""
    names = [name for name in options.deferred if name.startswith("durable_")]
    unknown = [name for name in names if name not in options]
    if unknown:
        known = ", ".join(name for name, *_ in settings.OPTIONS)
        fatal(f"unknown option {', '.join(sorted(unknown))} (durable options: {known})")
    specs: list[str] = []
    for name in names:
        value = options.deferred.pop(name)
        specs += [f"{name}={v}" for v in getattr(value, "val", [value])] or [name]
    try:
        options.set(*specs)
    except exceptions.OptionsError as e:
        fatal(str(e))


def fatal(reason: str) -> None:
    """A configuration error at start: one line saying why, and the process exits (status 2)
    before it serves anything; it never serves unjournaled because an option was wrong."""
    reason = reason.removeprefix("durable: ")
    print(f"durable: configuration error: {reason}; the sidecar did not start", file=sys.stderr, flush=True)
    os._exit(2)
