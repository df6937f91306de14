"""The durable sidecar addon: a thin conductor over identity, fingerprinting, the cursor and the journal.

Life of a step (DESIGN.md section 3): a request that matches nothing is committed as `pending`
BEFORE it is forwarded; its response is committed BEFORE the agent receives it. A request that
matches a completed step is answered from the journal with no upstream connection at all. A step
left pending by a crash is re-sent with its original idempotency key. Any journal failure is
answered with a 503: the sidecar fails closed and never forwards an unjournaled call.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import connection, ctx, http

from . import divergence, faults, fingerprint, identity, redaction, responses, settings, streams
from .cursor import Claim, RunCursor, StepRef
from .journal import Journal, JournalError, NewStep, encode_headers

logger = logging.getLogger("durable")

META = "durable"


@dataclass
class Step:
    """What the sidecar knows about one flow between its request and response hooks."""

    run: str | None
    seq: int | None
    outcome: str
    live: bool = False  # forwarded upstream and waiting to be journaled
    ref: StepRef | None = None
    tee: streams.StreamTee | None = None  # set when the response streams to the agent
    started: float = field(default_factory=time.monotonic)


class Refused(Exception):
    """Answer the agent with this error instead of forwarding."""

    def __init__(self, status: int, reason: str, **details: Any) -> None:
        super().__init__(reason)
        self.status, self.reason, self.details = status, reason, details


class DurableSidecar:
    def __init__(self) -> None:
        self.settings: settings.Settings | None = None
        self.journal: Journal | None = None
        self.default_run = identity.mint_id("run")
        self.default_attempt = identity.mint_id("attempt")
        self.credentials: weakref.WeakKeyDictionary[connection.Client, identity.Credentials] = (
            weakref.WeakKeyDictionary()
        )
        self.cursors: dict[tuple[str, str], asyncio.Task[RunCursor]] = {}
        self.divergences = 0

    # -- mitmproxy life cycle ---------------------------------------------------------------

    def load(self, loader: Any) -> None:
        for name, typespec, default, help_text in settings.OPTIONS:
            loader.add_option(name, typespec, default, help_text)

    def configure(self, updated: set[str]) -> None:
        if not any(name.startswith("durable_") for name in updated) and self.settings is not None:
            return
        new = settings.from_options(ctx.options)
        if self.journal is None or (self.settings and (new.dsn, new.db_timeout_s) != (self.settings.dsn, self.settings.db_timeout_s)):
            self.journal = Journal(new.dsn, timeout_s=new.db_timeout_s)
            self.cursors.clear()
        self.settings = new

    async def running(self) -> None:
        if ctx.options.connection_strategy != "lazy":
            # replay must not need the upstream: no eager connection at CONNECT time
            ctx.options.update(connection_strategy="lazy")
        logger.info(
            "durable: runs without an id go to run %s, attempt %s", self.default_run, self.default_attempt
        )
        assert self.journal is not None
        try:
            await self.journal.open()
        except Exception as e:
            logger.warning("durable: journal not reachable yet (%s); answering 503 until it is", e)

    def done(self) -> None:
        # Sync on purpose (a script reload calls done synchronously); the pool dies with the process.
        self.cursors.clear()

    # -- identity on CONNECT ------------------------------------------------------------------

    def http_connect(self, flow: http.HTTPFlow) -> None:
        """HTTPS: the run credentials arrive on CONNECT and hold for the whole client connection."""
        try:
            creds = identity.parse_proxy_authorization(flow.request.headers.get(identity.PROXY_AUTH_HEADER))
        except identity.IdentityError as e:
            logger.warning("durable: CONNECT refused: %s", e)
            flow.response = responses.refusal(400, str(e))
            return
        self.credentials[flow.client_conn] = creds

    # -- the step life cycle --------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Bodies over the cap are never buffered: refused before anything is sent, or passed through."""
        assert self.settings is not None
        length = streams.declared_length(flow.request.headers)
        if length is None or length <= self.settings.body_cap or flow.response is not None:
            return
        reason = f"request body of {length} bytes is over durable_body_cap ({self.settings.body_cap})"
        if self.settings.oversize_request == "refuse":
            self._refuse(flow, 413, reason + "; nothing was forwarded")
            return
        logger.warning("durable: %s %s passes through unjournaled: %s", flow.request.method, flow.request.pretty_url, reason)
        for name in identity.control_header_names(list(flow.request.headers.keys())):
            flow.request.headers.pop(name, None)
        flow.request.stream = True
        flow.metadata[META] = Step(None, None, "passthrough")

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.is_replay or META in flow.metadata:
            return
        try:
            await self._request(flow)
        except Refused as e:
            self._refuse(flow, e.status, e.reason, **e.details)
        except JournalError as e:
            self._refuse(flow, 503, "journal unavailable: nothing was forwarded", failed=str(e))
        except Exception as e:  # mitmproxy would forward a flow whose hook raised: fail closed
            logger.exception("durable: internal error")
            self._refuse(flow, 503, "sidecar error: nothing was forwarded", failed=f"{type(e).__name__}: {e}")

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Event streams, bodies of unknown length and bodies over the cap reach the agent live."""
        step: Step | None = flow.metadata.get(META)
        if step is None or not step.live or flow.response is None:
            return
        assert self.settings is not None
        if streams.streams(flow.response.headers, self.settings.body_cap):
            step.tee = streams.StreamTee(self.settings.body_cap)
            flow.response.stream = step.tee
            responses.label(flow.response, step.run, step.seq, step.outcome)  # headers leave now

    async def response(self, flow: http.HTTPFlow) -> None:
        step: Step | None = flow.metadata.get(META)
        if step is None or flow.response is None:
            return
        if step.live:
            try:
                await self._journal_response(flow, step)
            except Exception as e:
                logger.error("durable: run=%s seq=%s response not journaled: %s", step.run, step.seq, e)
                step.outcome = "refused"
                if step.tee is not None:
                    # Already streamed: withhold the end of the stream so the agent sees it cut short.
                    flow.kill()
                    return
                flow.response = responses.refusal(
                    503,
                    "the upstream answered but the journal could not record it; the step stays in doubt "
                    "and the next attempt re-sends it with its original idempotency key",
                    run=step.run,
                    step=step.seq,
                    failed=str(e),
                )
        responses.label(flow.response, step.run, step.seq, step.outcome)
        self._log(step, flow.response.status_code)

    async def error(self, flow: http.HTTPFlow) -> None:
        """The exchange broke. Before any answer: journal a failure. Mid-answer: the step is in doubt."""
        step: Step | None = flow.metadata.get(META)
        if step is None or not step.live or step.run is None or step.seq is None:
            return
        step.live = False
        message = flow.error.msg if flow.error else "unknown error"
        assert self.journal is not None
        try:
            if flow.response is None:
                await self.journal.fail(step.run, step.seq, message, self._elapsed_ms(step))
                state = "failed"
            else:  # the upstream began to answer: unless the answer was complete, the step is in doubt
                finished = step.tee is not None and step.tee.finished() and not step.tee.overflowed
                state = await self._journal_answer(flow.response, step, truncated=not finished)
            if step.ref:
                step.ref.state = state
        except JournalError as e:
            logger.error("durable: run=%s seq=%s failure not journaled (%s); step stays in doubt", step.run, step.seq, e)
        self._log(step, None, note=message)

    # -- request handling -----------------------------------------------------------------------

    async def _request(self, flow: http.HTTPFlow) -> None:
        assert self.settings is not None and self.journal is not None
        s = self.settings
        req = flow.request
        ident = self._identify(flow)
        for name in identity.control_header_names(list(req.headers.keys())):
            req.headers.pop(name, None)
        if s.ignored(req.host) or req.headers.get("upgrade", "").lower() == "websocket":
            flow.metadata[META] = Step(ident.run, None, "passthrough")
            return

        try:
            parts = fingerprint.request_parts(req)
        except ValueError as e:
            raise Refused(400, f"request body does not match its Content-Encoding: {e}", run=ident.run)
        env = fingerprint.envelope(parts, s.rules)
        key = f"key:{ident.step_key}" if ident.step_key else f"v{fingerprint.VERSION}:{fingerprint.fingerprint(env)}"

        cursor = await self._cursor(ident.run, ident.attempt)
        claim = cursor.claim(key)
        step = claim.step
        if step is None:
            step = await self._record(flow, ident, cursor, claim, env, parts.body)
        if step is not None:
            await self._answer_journaled(flow, ident, cursor, step)

    def _identify(self, flow: http.HTTPFlow) -> identity.Identity:
        assert self.settings is not None
        headers = flow.request.headers
        try:
            creds = identity.parse_proxy_authorization(headers.get(identity.PROXY_AUTH_HEADER))
            if creds == identity.Credentials():
                creds = self.credentials.get(flow.client_conn, creds)
            control = {k.lower(): v for k, v in headers.items() if k.lower().startswith(identity.CONTROL_PREFIX)}
            return identity.resolve(
                control, creds, self.settings.run, self.settings.attempt, self.default_run, self.default_attempt
            )
        except identity.IdentityError as e:
            raise Refused(400, str(e))

    async def _cursor(self, run: str, attempt: str) -> RunCursor:
        """The attempt's cursor, loading the run's index (no bodies) from the journal once."""
        key = (run, attempt)
        task = self.cursors.get(key)
        if task is None:
            assert self.journal is not None
            task = asyncio.ensure_future(self._load_cursor(run))
            self.cursors[key] = task
        try:
            return await task
        except Exception:
            if self.cursors.get(key) is task:
                del self.cursors[key]  # let the next request try again
            raise

    async def _load_cursor(self, run: str) -> RunCursor:
        assert self.journal is not None
        return RunCursor.from_steps(await self.journal.load_run(run))

    async def _record(
        self,
        flow: http.HTTPFlow,
        ident: identity.Identity,
        cursor: RunCursor,
        claim: Claim,
        env: dict[str, Any],
        body: bytes,
    ) -> StepRef | None:
        """Nothing journaled for this request: commit it as pending, then let it go upstream.

        Returns the journaled step instead when another sidecar or attempt recorded it meanwhile.
        """
        assert self.settings is not None and self.journal is not None
        s, req = self.settings, flow.request
        outcome = "recorded"
        ahead = cursor.ahead()
        if ahead:
            outcome = "diverged"
            await self._report_divergence(ident, cursor, claim, ahead, env, body)

        header = s.idempotency_header(req.host)
        agent_key = req.headers.get(header)
        faults.crash_point("before-pending-commit")
        recorded = await self.journal.record(
            NewStep(
                run=ident.run,
                attempt=ident.attempt,
                key=claim.key,
                fp_version=fingerprint.VERSION,
                occurrence=claim.occurrence,
                step_key=ident.step_key,
                method=req.method,
                url=req.pretty_url,
                envelope=env,
                request_headers=encode_headers(redaction.redact_headers(req.headers.fields)),
                request_body=body,
                agent_idempotency_key=agent_key,
                mint_idempotency_key=req.method.upper() in s.idempotency_methods,
            )
        )
        if recorded is None:
            existing = await self.journal.find(ident.run, claim.key, claim.occurrence)
            if existing is None:
                raise JournalError(f"step {claim.key}#{claim.occurrence} neither recorded nor found")
            cursor.add(existing)
            return existing
        ref = StepRef(recorded.seq, claim.key, claim.occurrence, "pending")
        cursor.add(ref)
        if recorded.idempotency_key and not agent_key:
            req.headers[header] = recorded.idempotency_key
        faults.crash_point("after-pending-commit")
        flow.metadata[META] = Step(ident.run, recorded.seq, outcome, live=True, ref=ref)
        return None

    async def _report_divergence(
        self,
        ident: identity.Identity,
        cursor: RunCursor,
        claim: Claim,
        ahead: list[StepRef],
        env: dict[str, Any],
        body: bytes,
    ) -> None:
        assert self.settings is not None and self.journal is not None
        rows = await self.journal.requests(ident.run, [s.seq for s in ahead[: divergence.LIMIT]])
        near = divergence.nearest(rows, env, body)
        expected, diff = near if near else (None, [])
        self.divergences += 1
        logger.warning(
            "durable: run=%s attempt=%s diverged from the journal (%d unconsumed steps ahead, nearest seq %s): %s",
            ident.run,
            ident.attempt,
            len(ahead),
            expected,
            diff,
        )
        if self.settings.strict:
            cursor.release(claim)
            raise Refused(
                409,
                "request diverges from the journal (durable_strict)",
                run=ident.run,
                attempt=ident.attempt,
                expected_step=expected,
                diff=diff,
            )

    async def _answer_journaled(
        self, flow: http.HTTPFlow, ident: identity.Identity, cursor: RunCursor, step: StepRef
    ) -> None:
        assert self.settings is not None and self.journal is not None
        s = self.settings
        if step.state == "completed" or (step.state == "failed" and cursor.moved_past(step.seq)):
            stored = await self.journal.replay(ident.run, step.seq)
            if stored.status is None:  # a journaled connection failure
                flow.response = responses.refusal(
                    502, "journaled upstream failure, replayed", run=ident.run, step=step.seq, failed=stored.error
                )
            else:
                flow.response = responses.rebuild(
                    flow.request.method,
                    flow.request.data.http_version,
                    stored.status,
                    stored.reason,
                    stored.headers,
                    stored.body,
                )
            flow.metadata[META] = Step(ident.run, step.seq, "replayed")
            return

        # In doubt (pending) or failed at the tail of the run: send it again with its original key.
        resolve_hint = f"durable resolve {ident.run} {step.seq} --reissue | --forget"
        if step.state == "pending" and s.in_doubt == "fail":
            raise Refused(
                409,
                "step is in doubt: it was forwarded but its answer was never journaled",
                run=ident.run,
                step=step.seq,
                resolve=resolve_hint,
            )
        taken = await self.journal.reissue(ident.run, step.seq, ident.attempt, s.in_doubt_window_s)
        if taken is None:
            raise Refused(
                409,
                "step is in doubt for longer than durable_in_doubt_window; the upstream may have "
                "forgotten its idempotency key, so it is not re-sent automatically",
                run=ident.run,
                step=step.seq,
                resolve=resolve_hint,
            )
        if taken.idempotency_key:
            flow.request.headers[s.idempotency_header(flow.request.host)] = taken.idempotency_key
        step.state = "pending"
        flow.metadata[META] = Step(ident.run, step.seq, "reissued", live=True, ref=step)

    async def _journal_response(self, flow: http.HTTPFlow, step: Step) -> None:
        assert flow.response is not None
        truncated = step.tee is not None and (step.tee.overflowed or not step.tee.finished())
        if step.tee is not None and step.tee.overflowed:
            logger.warning(
                "durable: run=%s seq=%s response of %d bytes is over durable_body_cap: streamed through, "
                "not journaled; the step stays in doubt and a later attempt re-sends it",
                step.run,
                step.seq,
                step.tee.size,
            )
        step.live = False  # claimed: the error hook of a client that hangs up now must not journal it again
        state = await self._journal_answer(flow.response, step, truncated)
        if step.ref:
            step.ref.state = state

    async def _journal_answer(self, resp: http.Response, step: Step, truncated: bool) -> str:
        """Commit the answer; returns the step's new state (a truncated answer leaves it pending, in doubt)."""
        assert self.settings is not None and self.journal is not None
        assert step.run is not None and step.seq is not None
        if truncated:
            state = "pending"
        elif resp.status_code in self.settings.transient_statuses:
            state = "failed"
        else:
            state = "completed"
        body = step.tee.recorded() if step.tee is not None else (resp.raw_content or b"")
        faults.crash_point("before-complete-commit")
        await self.journal.complete(
            step.run,
            step.seq,
            state,
            resp.status_code,
            resp.reason,
            resp.http_version,
            encode_headers(resp.headers.fields),
            body,
            self._elapsed_ms(step),
            streamed=step.tee is not None,
            truncated=truncated,
        )
        faults.crash_point("after-complete-commit")
        return state

    # -- helpers --------------------------------------------------------------------------------

    def _refuse(self, flow: http.HTTPFlow, status: int, reason: str, **details: Any) -> None:
        run = details.get("run")
        logger.warning("durable: refused %s %s (%d): %s %s", flow.request.method, flow.request.pretty_url, status, reason, details.get("failed", ""))
        flow.response = responses.refusal(status, reason, **details)
        flow.metadata[META] = Step(run, details.get("step"), "refused")

    @staticmethod
    def _elapsed_ms(step: Step) -> float:
        return (time.monotonic() - step.started) * 1000

    def _log(self, step: Step, status: int | None, note: str = "") -> None:
        logger.info(
            "durable run=%s seq=%s outcome=%s status=%s ms=%.1f%s",
            step.run,
            step.seq,
            step.outcome,
            status,
            self._elapsed_ms(step),
            f" {note}" if note else "",
        )

