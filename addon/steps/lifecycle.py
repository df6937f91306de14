"""The life of a step (DESIGN.md section 3), from a request's arrival to its journaled answer.

A request that matches nothing is committed as `pending` BEFORE it is forwarded; its response is
committed BEFORE the agent receives it. A request that matches a completed step is answered from the
journal. A step left pending by a crash, or failed at the tail of the run, is sent again with its
original idempotency key. The addon's hooks call `begin`, `finish` and `break_off`; everything
here raises `Refused` or `JournalError` rather than let an unjournaled call through.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from mitmproxy import http

from ..matching import bodies, choice, fingerprint, identity, redaction
from ..store import crypto, offload
from ..store.cursor import Claim, RunCursor, StepRef
from ..store.journal import Journal, JournalError, NewStep, NotOurs, ReplyLost, encode_headers
from . import divergence, faults, positions, responses, streams
from .inflight import InFlight, Slot
from .pacing import Pacer
from .positions import Positions
from .prefetch import Budget
from .repairs import Held, Repairs
from .responses import Refused
from .settings import Settings

logger = logging.getLogger("durable")


@dataclass
class Step:
    """What the sidecar knows about one flow between its request and response hooks."""

    run: str | None
    seq: int | None
    outcome: str
    attempt: str | None = None
    live: bool = False  # forwarded upstream and waiting to be journaled
    cursor: RunCursor | None = None  # the attempt's cursor, told the step's state once it is journaled
    tee: streams.StreamTee | None = None  # set when the response streams to the agent
    paced: bool = False  # replayed through the pacer, at the recorded pace
    started: float = field(default_factory=time.monotonic)
    claim: Claim | None = None  # the attempt's claim on the step: given back if the agent gets no answer
    slot: Slot | None = None  # held while this flow sends the step (single flight)
    owner: int | None = None  # the lease id the journal row names while the step is in flight
    session: bool = False  # the request belongs to an upstream session (MCP's Mcp-Session-Id)


class AnswerHeld(JournalError):
    """The upstream answered but the journal could not record it: the sidecar holds the answer and
    commits it when the journal is back; the agent's retry is answered from the journal, not re-sent."""


POLL_S = 0.2  # how often a step in flight in another sidecar is looked at
NOT_RECORDED = "not in the recording (durable_offline): never forwarded"


class Lifecycle:
    """Steps of every run this sidecar serves: the replay cursors and the journal writes.

    Over 300 lines, on purpose: the record, replay and settle paths share one claim on the
    attempt's cursor and one single-flight slot, which every path must give back on every exit,
    and those rules (`give_back`, `abandon`, `_hold`) are checked by reading them together.
    Already apart: the attempts' positions (positions.py), held answers (repairs.py). The next
    seam, should it grow: journaling the answer (`finish`, `break_off`, `_hold`, `_answer`).
    """

    def __init__(self, journal: Journal, settings: Settings, redactor: redaction.Redactor) -> None:
        self.journal = journal
        self.settings = settings  # replaced by the addon when options change
        self.redactor = redactor
        self.positions = Positions(journal, Budget(settings.read_ahead_bytes))
        self.fp_versions: OrderedDict[str, int] = OrderedDict()  # each run's fingerprint version
        self.in_flight = InFlight()
        self.repairs = Repairs(journal, self.in_flight)
        self.divergences = 0
        self.on_divergence: Callable[[], None] = lambda: None  # metrics hook
        self.pacer: Pacer | None = None  # set by the addon with durable_replay_pacing

    async def begin(self, flow: http.HTTPFlow, ident: identity.Identity) -> Step:
        """Journal the request before it may leave, or answer it from the journal (flow.response).

        Whatever the sidecar answers itself instead (an error) does not consume the step: the
        attempt's claim is given back, so the agent's retry matches the same step.
        """
        s, req = self.settings, flow.request
        raw = fingerprint.raw_parts(req)
        version = await self._fp_version(ident.run)
        try:
            decoded, env, key = await offload.run_cpu(
                fingerprint.cost(raw),
                s.offload_bytes,
                fingerprint.match,
                raw,
                ident.step_key,
                s.body_cap,
                s.rules,
                version,
            )
            body = raw.body if decoded is None else decoded
        except bodies.OverCap as e:
            raise Refused(413, f"{e}; nothing was forwarded", run=ident.run) from e
        except ValueError as e:
            raise Refused(400, f"request body does not match its Content-Encoding: {e}", run=ident.run) from e

        position = self.positions.get(ident.run, ident.attempt, self.settings.max_attempts)
        cursor = position.cursor
        chosen_by = choice.digest(req, body, s.choosers(req.host), self.redactor.digest)
        claim = cursor.claim(key)
        try:
            if not position.index.done():
                claim = await self.positions.claim_while_loading(ident.run, position, claim)
            claim = await self.positions.prefer(ident.run, position, claim, chosen_by)
            step = await self._serve(flow, ident, cursor, claim, env, body, chosen_by)
        except BaseException:
            cursor.release(claim.key, claim.occurrence, claim.step.seq if claim.step else None)
            raise
        if not step.live and client_gone(flow):  # the agent hung up as its answer came: it reaches nobody
            cursor.release(claim.key, claim.occurrence, step.seq)
        else:
            step.claim = claim
        return step

    async def _fp_version(self, run: str) -> int:
        """The fingerprint version of the run: the one its steps were journaled with, so a run
        recorded under v1 keeps matching; a new run gets the current one. Asked once per run."""
        version = self.fp_versions.get(run)
        if version is None:
            version = await self.journal.fp_version(run) or fingerprint.VERSION
            if version not in fingerprint.VERSIONS:
                raise Refused(409, f"run {run} was journaled with fingerprint v{version}, unknown to this sidecar")
            self.fp_versions[run] = version
            while len(self.fp_versions) > positions.FORGOTTEN_KEPT:
                self.fp_versions.popitem(last=False)
        else:
            self.fp_versions.move_to_end(run)
        return version

    async def _serve(
        self,
        flow: http.HTTPFlow,
        ident: identity.Identity,
        cursor: RunCursor,
        claim: Claim,
        env: dict[str, Any],
        body: bytes,
        chosen_by: str | None,
    ) -> Step:
        journaled = claim.step
        if journaled is not None and self._replayable(cursor, journaled):
            return await self._replay(flow, ident, journaled)
        if self.settings.offline:
            await self._not_recorded(flow, ident, cursor, claim, env, body, chosen_by)
        slot = (ident.run, claim.key, claim.occurrence)
        if slot in self.repairs.held:  # its answer is in hand: journal it now (or 503), then replay it
            await self.repairs.commit_now(slot)
        if not await self.in_flight.enter(slot, self.settings.in_flight_wait_s, lambda: client_gone(flow)):
            raise self._still_in_flight(flow, ident, journaled)
        try:
            if journaled is None:
                recorded = await self._record(flow, ident, cursor, claim, env, body, chosen_by)
                if isinstance(recorded, Step):
                    recorded.slot = slot
                    return recorded
                journaled = recorded  # another sidecar or attempt journaled it meanwhile
            step = await self._settle(flow, ident, cursor, journaled)
        except BaseException:
            self.in_flight.leave(slot)
            raise
        if step.live:
            step.slot = slot
        else:
            self.in_flight.leave(slot)
        return step

    async def finish(self, flow: http.HTTPFlow, step: Step) -> None:
        """The upstream answered: commit the answer before the agent may have (the rest of) it."""
        assert flow.response is not None
        truncated = step.tee is not None and not step.tee.complete()
        if step.tee is not None and step.tee.overflowed:
            logger.warning(
                "durable: run=%s seq=%s response of %d bytes is over durable_body_cap: streamed through, "
                "not journaled; the step stays in doubt and a later attempt re-sends it",
                step.run,
                step.seq,
                step.tee.size,
            )
        step.live = False  # claimed: the error hook of a client that hangs up now must not journal it again
        state, commit = self._answer(flow.response, step, truncated)
        try:
            await commit()
        except JournalError as e:
            if not isinstance(e, NotOurs) and self._hold(step, flow.response, state, commit):
                raise AnswerHeld(f"{e}; the answer is held and journaled once the journal is back") from e
            self.abandon(step)
            raise
        except BaseException:
            self.abandon(step)
            raise
        if step.cursor and step.seq is not None:
            step.cursor.mark(step.seq, state)
        self.in_flight.leave(step.slot)
        if truncated and step.tee is not None and not step.tee.finished():
            self.give_back(step)  # the agent saw the stream cut: its retry is this step again

    async def break_off(self, flow: http.HTTPFlow, step: Step, message: str) -> None:
        """The exchange broke. Journal `failed` only if the request provably never left (no
        connection to the upstream); otherwise the upstream may have it: the step is in doubt."""
        assert step.run is not None and step.seq is not None
        step.live = False
        state, held = "pending", False
        try:
            if flow.response is not None:  # the upstream began to answer: unless it was complete, in doubt
                truncated = step.tee is None or not step.tee.complete()
                state, commit = self._answer(flow.response, step, truncated)
                try:
                    await commit()
                except JournalError as e:  # a whole answer in hand is held, as finish() does
                    if (
                        truncated
                        or isinstance(e, NotOurs)
                        or not (held := self._hold(step, flow.response, state, commit))
                    ):
                        raise
                    return
            elif never_left(flow):
                await self.journal.fail(step.run, step.seq, message, elapsed_ms(step), step.owner)
                state = "failed"
            else:
                await self.journal.let_go(step.run, step.seq, step.owner or 0)
                logger.warning(
                    "durable: run=%s seq=%s in doubt: %s after the request may have reached the upstream",
                    step.run,
                    step.seq,
                    message,
                )
            if step.cursor:
                step.cursor.mark(step.seq, state)
        except JournalError as e:
            logger.error(
                "durable: run=%s seq=%s failure not journaled (%s); step stays in doubt", step.run, step.seq, e
            )
        finally:
            if not held:  # a held answer keeps its step in flight here until it is journaled
                self.in_flight.leave(step.slot)
                if state == "pending":
                    self.give_back(step)

    def _hold(self, step: Step, resp: http.Response, state: str, commit: Callable[[], Awaitable[None]]) -> bool:
        """Keep an answer whose commit failed (repairs.py): the step stays in flight here, its claim
        goes back to the attempt, and the commit is retried until the journal takes it."""
        if step.slot is None or step.run is None or step.seq is None:
            return False
        slot, cursor, seq = step.slot, step.cursor, step.seq
        size = len(step.tee.recorded()) if step.tee is not None else len(resp.raw_content or b"")

        def settled(journaled: bool) -> None:
            if journaled and cursor is not None:
                cursor.mark(seq, state)
            self.in_flight.leave(slot)

        if not self.repairs.hold(slot, Held(commit, size, settled)):
            logger.error("durable: run=%s seq=%s answer dropped: over the answers the sidecar holds", step.run, seq)
            return False
        logger.warning(
            "durable: run=%s seq=%s the journal could not record the answer: held (%d held), its commit retried",
            step.run,
            seq,
            len(self.repairs.held),
        )
        self.give_back(step)
        return True

    def abandon(self, step: Step) -> None:
        """The sidecar answers the agent with an error for a step it sent (its answer could not be
        journaled): nobody sends it now, and the agent's retry matches it again (and reissues it)."""
        step.live = False
        self.in_flight.leave(step.slot)
        self.give_back(step)

    def give_back(self, step: Step) -> None:
        """The agent will not get this step's answer on this request: its retry in this attempt
        matches the same step (and waits for it while it is in flight, or replays it)."""
        if step.cursor is not None and step.claim is not None:
            step.cursor.release(step.claim.key, step.claim.occurrence, step.seq)
            step.claim = None

    async def _record(
        self,
        flow: http.HTTPFlow,
        ident: identity.Identity,
        cursor: RunCursor,
        claim: Claim,
        env: dict[str, Any],
        body: bytes,
        chosen_by: str | None,
    ) -> Step | StepRef:
        """Nothing journaled for this request: commit it as pending, then let it go upstream.

        Returns the journaled step instead when another sidecar or attempt recorded it meanwhile.
        """
        s, req = self.settings, flow.request
        # what is stored, and what a divergence is diffed on: credentials hashed
        stored_env = self.redactor.envelope(env)
        content_type = req.headers.get("content-type", "")
        stored_body = body
        if self.redactor.rewrites(content_type):
            stored_body = await offload.run_cpu(len(body), s.offload_bytes, self.redactor.body, body, content_type)
        outcome, diverged = "recorded", None
        ahead = cursor.ahead(divergence.LIMIT)
        if ahead[1]:
            outcome = "diverged"
            diverged = await self._report_divergence(ident, ahead, stored_env, stored_body)

        header = s.idempotency_header(req.host)
        agent_key = req.headers.get(header)
        owner = await self.journal.owner()
        faults.crash_point("before-pending-commit")
        new_step = NewStep(
            run=ident.run,
            attempt=ident.attempt,
            key=claim.key,
            fp_version=env["v"],
            occurrence=claim.occurrence,
            step_key=ident.step_key,
            method=req.method,
            url=crypto.seal_url(
                self.journal.keyring, self.redactor.url(req.pretty_url), s.clear_path(req.host, req.path)
            ),
            envelope=stored_env,
            request_headers=encode_headers(self.redactor.headers(req.headers.fields)),
            request_body=stored_body,
            agent_idempotency_key=agent_key,
            mint_idempotency_key=req.method.upper() in s.idempotency_methods,
            outcome=outcome,
            divergence=diverged,
            owner=owner,
            choice=chosen_by,
        )
        slot = (ident.run, claim.key, claim.occurrence)
        try:
            recorded = await self.journal.record(new_step)
        except ReplyLost:  # the row is most likely this call's own, never sent: _settle sends it once
            self.repairs.not_sent(slot, owner)
            recorded = None
        except JournalError:  # the row may exist, naming this sidecar, for a call it never sent
            self.repairs.not_sent(slot, owner)
            raise
        if recorded is None:
            existing = await self.journal.find(ident.run, claim.key, claim.occurrence)
            if existing is None:
                raise JournalError(f"step {claim.key}#{claim.occurrence} neither recorded nor found")
            cursor.add(existing)
            return existing
        cursor.add(StepRef(recorded.seq, claim.key, claim.occurrence, "pending"))
        if recorded.idempotency_key and not agent_key:
            req.headers[header] = recorded.idempotency_key
        faults.crash_point("after-pending-commit")
        return Step(ident.run, recorded.seq, outcome, ident.attempt, live=True, cursor=cursor, owner=owner)

    async def _not_recorded(
        self,
        flow: http.HTTPFlow,
        ident: identity.Identity,
        cursor: RunCursor,
        claim: Claim,
        env: dict[str, Any],
        body: bytes,
        chosen_by: str | None,
    ) -> NoReturn:
        """durable_offline (`durable test`): nothing leaves. A request the journal cannot answer is
        journaled as a failed step, never forwarded, so the test's report can name it and diff it
        against the recording; then it is refused with a 404 the agent does not retry."""
        slot = (ident.run, claim.key, claim.occurrence)
        if claim.step is None and await self.in_flight.enter(slot, 0):
            try:
                recorded = await self._record(flow, ident, cursor, claim, env, body, chosen_by)
                if isinstance(recorded, Step) and recorded.seq is not None:
                    await self.journal.fail(ident.run, recorded.seq, NOT_RECORDED, 0.0, recorded.owner)
                    cursor.mark(recorded.seq, "failed")
            finally:
                self.in_flight.leave(slot)
        raise Refused(404, NOT_RECORDED, run=ident.run, attempt=ident.attempt)

    async def _report_divergence(
        self,
        ident: identity.Identity,
        ahead: tuple[list[int], int],
        env: dict[str, Any],
        body: bytes,
    ) -> dict[str, Any]:
        """Log (and count) a request that matches nothing while journaled steps lie ahead.

        Returns what is journaled with the new step; raises Refused under durable_strict.
        """
        seqs, count = ahead
        rows = await self.journal.requests(ident.run, seqs)
        size = len(body) + sum(len(row["request_body"] or b"") for row in rows)
        near = await offload.run_cpu(size, self.settings.offload_bytes, divergence.nearest, rows, env, body)
        expected, diff = near if near else (None, [])
        self.divergences += 1
        self.on_divergence()
        logger.warning(
            "durable: divergence #%d: run=%s attempt=%s matches nothing journaled "
            "(%d unconsumed steps ahead, nearest seq %s): %s",
            self.divergences,
            ident.run,
            ident.attempt,
            count,
            expected,
            divergence.hashed(diff, self.redactor.digest),  # paths and keyed hashes: no value is logged
        )
        if self.settings.strict:
            raise Refused(
                409,
                "request diverges from the journal (durable_strict)",
                run=ident.run,
                attempt=ident.attempt,
                expected_step=expected,
                diff=diff,
            )
        return {"attempt": ident.attempt, "expected_step": expected, "diff": diff}

    @staticmethod
    def _replayable(cursor: RunCursor, step: StepRef) -> bool:
        """Answered from the journal: a completed step, or a failed one the run moved past (the
        agent handled that failure then)."""
        return step.state == "completed" or (step.state == "failed" and cursor.moved_past(step.seq))

    async def _replay(self, flow: http.HTTPFlow, ident: identity.Identity, step: StepRef) -> Step:
        prefetch = self.positions.prefetches.get((ident.run, ident.attempt))  # none while the index streams in
        stored = prefetch.take(step.seq) if prefetch is not None else None
        if stored is None:
            stored = (await self.journal.responses(ident.run, [step.seq])).get(step.seq)
        if stored is None:
            raise JournalError(f"read journaled response: step {ident.run}/{step.seq} is gone")
        if (stored.key, stored.occurrence) != (step.key, step.occurrence):  # two keys share an index digest
            raise JournalError(f"read journaled response: step {ident.run}/{step.seq} answers another request")
        self.journal.note_replay(ident.run, step.seq, ident.attempt)
        paceable = (
            stored.chunk_timing and stored.status is not None and stored.trailers is None
        )  # the pacer speaks HTTP/1
        if self.pacer is not None and self.settings.replay_pacing and paceable:
            self.pacer.stage(flow, stored)
            return Step(ident.run, step.seq, "replayed", ident.attempt, paced=True)
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
                stored.trailers,
            )
            responses.fit_encoding(flow.response, flow.request.headers.get("accept-encoding", ""))
        return Step(ident.run, step.seq, "replayed", ident.attempt)

    async def _settle(self, flow: http.HTTPFlow, ident: identity.Identity, cursor: RunCursor, step: StepRef) -> Step:
        """A journaled step that is not (known to be) complete: replay it if it completed meanwhile,
        wait while another sidecar has it in flight, else send it again with its original key when
        the in-doubt policy allows (or it failed at the tail of the run)."""
        s = self.settings
        policy = s.in_doubt_policy(flow.request.host)
        deadline = time.monotonic() + s.in_flight_wait_s
        slot = (ident.run, step.key, step.occurrence)
        unsent = self.repairs.never_sent(slot)
        suspect: tuple[int, int | None] | None = None  # an owner whose lock is free, and its generation
        suspected_at = 0.0
        while True:
            if step.state == "completed":
                return await self._replay(flow, ident, step)
            dead = suspect if suspect and time.monotonic() - suspected_at >= s.lease_grace_s else None
            taken = await self.journal.take_over(
                ident.run, step, ident.attempt, policy == "reissue", s.in_doubt_window_s, dead, unsent
            )
            if taken.state is None:
                raise JournalError(f"step {ident.run}/{step.seq} is gone")
            if taken.taken:
                break
            step.state = taken.state
            cursor.mark(step.seq, taken.state)
            if taken.state == "completed":
                continue
            # an owner whose lock is free may be dead, or between losing its lease and taking it again:
            # it counts as dead once seen so, with one generation, for durable_lease_grace
            seen = (taken.owner, taken.generation) if taken.owner is not None and not taken.in_flight else None
            if seen != suspect:
                suspect, suspected_at = seen, time.monotonic()
            dying = seen is not None and dead != seen
            if dying or taken.in_flight or taken.state == "failed":  # failed, not taken: taken just now
                if time.monotonic() > deadline or client_gone(flow):
                    raise self._still_in_flight(flow, ident, step)
                await asyncio.sleep(POLL_S)
                continue
            if policy == "reissue" and taken.age_s < s.in_doubt_window_s:
                await asyncio.sleep(POLL_S)  # taken by another sidecar between our look and our update
                continue
            raise self._in_doubt_refusal(ident, step, policy)
        if unsent:  # its first send: the pending commit's reply was lost before it could leave
            self.repairs.sent(slot)
        else:
            logger.info(
                "durable: run=%s seq=%s %s %.0fs ago: re-sent with its original idempotency key",
                ident.run,
                step.seq,
                "in doubt since" if step.state == "pending" else "failed,",
                taken.age_s,
            )
        if taken.idempotency_key:
            flow.request.headers[s.idempotency_header(flow.request.host)] = taken.idempotency_key
        cursor.mark(step.seq, "pending")
        outcome = "recorded" if unsent else "reissued"
        return Step(ident.run, step.seq, outcome, ident.attempt, live=True, cursor=cursor, owner=self.journal.lease.id)

    def _in_doubt_refusal(self, ident: identity.Identity, step: StepRef, policy: str) -> Refused:
        resolve_hint = f"durable resolve {ident.run} {step.seq} --reissue | --forget | --complete-from FILE"
        if policy != "reissue":
            reason = "step is in doubt: it was forwarded but its answer was never journaled (durable_in_doubt=fail)"
        else:
            reason = (
                "step is in doubt for longer than durable_in_doubt_window; the upstream may have "
                "forgotten its idempotency key, so it is not re-sent automatically"
            )
        return Refused(409, reason, run=ident.run, step=step.seq, resolve=resolve_hint)

    def _still_in_flight(self, flow: http.HTTPFlow, ident: identity.Identity, step: StepRef | None) -> Refused:
        waited = (
            "the agent hung up while it waited" if client_gone(flow) else "did not finish within durable_in_flight_wait"
        )
        return Refused(
            503,
            f"this step is in flight in another attempt or sidecar and {waited}; nothing was forwarded, "
            "retry to wait again",
            run=ident.run,
            step=step.seq if step else None,
        )

    def _answer(self, resp: http.Response, step: Step, truncated: bool) -> tuple[str, Callable[[], Awaitable[None]]]:
        """The step's new state (a truncated answer leaves it pending, in doubt) and the commit that
        journals the answer: a callable, so an answer whose commit fails can be held and retried."""
        assert step.run is not None and step.seq is not None
        if truncated:
            state = "pending"
        elif resp.status_code in self.settings.transient_statuses or session_gone(step, resp):
            state = "failed"
        else:
            state = "completed"
        body = step.tee.recorded() if step.tee is not None else (resp.raw_content or b"")
        complete = functools.partial(
            self.journal.complete,
            step.run,
            step.seq,
            state,
            resp.status_code,
            resp.reason,
            resp.http_version,
            encode_headers(responses.unlabelled(resp.headers.fields)),
            body,
            elapsed_ms(step),
            streamed=step.tee is not None,
            truncated=truncated,
            chunk_timing=step.tee.timings if step.tee is not None and not truncated else None,
            owner=step.owner,
            trailers=encode_headers(resp.trailers.fields) if resp.trailers is not None else None,
        )

        async def commit() -> None:
            faults.crash_point("before-complete-commit")
            await complete()
            faults.crash_point("after-complete-commit")

        return state, commit


def session_gone(step: Step, resp: http.Response) -> bool:
    """A 404 to a request of an upstream session (MCP's Mcp-Session-Id): the session is gone (the
    server restarted, or it expired), not the call's answer. Journaled `failed`, never `completed`,
    so it is not replayed as the answer forever: the client starts a new session, and a step in doubt
    behind it can still be resolved."""
    return resp.status_code == 404 and step.session


def elapsed_ms(step: Step) -> float:
    return (time.monotonic() - step.started) * 1000


def never_left(flow: http.HTTPFlow) -> bool:
    """The request provably never reached the upstream: no TCP connection, or its TLS handshake failed."""
    server = flow.server_conn
    return server.timestamp_tcp_setup is None or (server.tls and server.timestamp_tls_setup is None)


def client_gone(flow: http.HTTPFlow) -> bool:
    return flow.client_conn.timestamp_end is not None
