"""WebSocket conversations as steps: each client message is a step, the server messages that follow
it are its answer.

A client message is journaled like a request (`WS <url>`, the message as its body, fingerprinted
like one, with its occurrence in the run) before it may leave; its answer (the server messages
until the next client message or the close, with their timing) is journaled before it reaches the
agent. The handshake is a step of its own, whose answer is the 101 and any greeting the server
sends before the first client message. On resume the handshake and every matching message are
answered from the journal with no upstream connection; the first message that matches nothing
opens one (upstream_ws.py) and the conversation goes live, recorded from there.

When is an answer journaled? A message whose answer has a known end marker (a Responses API
`response.create`, ended by `response.completed`, `.failed`, `.incomplete` or `error`; a JSON-RPC
request, ended by the response to its id) is journaled at that end, before the end is delivered:
an agent that dies before it leaves the step in doubt, as a cut HTTP stream does. Any other
answer has no known end, so its first server message completes the step before it is delivered
and each later one is appended to it before it is delivered: an agent that got an answer and died
is replayed that answer, never charged again for it. The messages of one read are journaled in one
commit (ws_batch.py on mitmproxy's connection, the flusher here on the sidecar's own), so a burst
costs one commit, not one per message.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mitmproxy import connection, http
from mitmproxy.websocket import WebSocketMessage

from ..matching import bodies, identity
from ..steps.lifecycle import AnswerHeld, Lifecycle, Step
from ..steps.responses import Refused
from ..store.journal import JournalError
from . import ws_batch, ws_close, ws_resume
from .upstream_ws import Upstream

logger = logging.getLogger("durable")

METHOD = "WS"
CONTENT_TYPE = "application/x-durable-websocket+json"
END_TYPES = frozenset({"response.completed", "response.failed", "response.incomplete", "error"})
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455's, for Sec-WebSocket-Accept
ABNORMAL = 1006  # no close frame: the peer's process or connection died
UNJOURNALED = "the server's message could not be journaled, so it was not delivered"
# An answer with no end marker is journaled again whole at each server message (the journal keeps it
# as one document): past this many bytes written for one answer (about 1,100 messages of 100 bytes,
# or 11 of 1 MiB), it is taken back into doubt and the rest streams through, so a chatty answer
# costs bounded writes, not the square of its length.
REWRITE_BUDGET = 64 * 1024 * 1024


@dataclass
class Frame:
    """One server message: when it came (ms after the client message), its bytes, text or binary."""

    at_ms: float
    content: bytes
    text: bool


@dataclass(frozen=True)
class Close:
    """How the server closed the conversation after an answer: replayed to the agent as it was."""

    code: int
    reason: str = ""


def encode_answer(frames: list[Frame], closed: Close | None = None) -> bytes:
    """An answer as journaled: JSON a person can read in `durable show` (binary messages in base64)."""
    messages = [
        {"at_ms": round(f.at_ms, 1), "text": f.content.decode("utf-8", "replace")}
        if f.text
        else {"at_ms": round(f.at_ms, 1), "binary": base64.b64encode(f.content).decode()}
        for f in frames
    ]
    answer: dict = {"messages": messages, "closed": closed.code if closed else None}
    if closed and closed.reason:
        answer["reason"] = closed.reason
    return json.dumps(answer).encode()


def decode_answer(body: bytes) -> list[Frame]:
    if not body:
        return []
    return [
        Frame(m["at_ms"], m["text"].encode(), True)
        if "text" in m
        else Frame(m["at_ms"], base64.b64decode(m["binary"]), False)
        for m in json.loads(body)["messages"]
    ]


def decode_close(body: bytes) -> Close | None:
    """The server's close journaled with an answer, if it closed there."""
    answer = json.loads(body) if body else {}
    code = answer.get("closed")
    return sendable(code, answer.get("reason", "")) if isinstance(code, int) else None


def sendable(code: int | None, reason: str) -> Close:
    """A server's close as a close frame the agent can be sent: 1005 (no code) is a plain 1000; a
    connection that ended with no close frame at all (1006, None) or a TLS failure (1015) is named."""
    if code == 1005:
        return Close(1000, reason)
    if code is None or code in (1006, 1015):
        return Close(ws_close.code_for(502), "the upstream's connection ended without a close frame")
    return Close(code, reason)


def ends(request: bytes, frame: Frame) -> bool:
    """Does this server message end the answer to `request`? (Responses API events; JSON-RPC.)"""
    doc = bodies.json_object(frame.content) if frame.text else None
    if doc is None:
        return False
    if doc.get("type") in END_TYPES:
        return True
    if "id" in doc and ("result" in doc or "error" in doc):
        asked = bodies.json_object(request)
        return asked is not None and asked.get("id") == doc["id"]
    return False


def has_end(request: bytes) -> bool:
    """Does the answer to this client message have an end marker `ends` knows (a Responses API
    `response.create`, a JSON-RPC request with an id)? Else each server message is journaled
    before it is delivered: nothing says when such an answer is over."""
    doc = bodies.json_object(request)
    return doc is not None and (doc.get("type") == "response.create" or ("id" in doc and "method" in doc))


def is_upgrade(request: http.Request) -> bool:
    return request.headers.get("upgrade", "").lower() == "websocket"


def accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def replayed_handshake(flow: http.HTTPFlow) -> list[Frame]:
    """A 101 answered from the journal: its greeting taken out of the body (sent as messages once the
    conversation starts), and its Sec-WebSocket-Accept made for this client's key."""
    assert flow.response is not None
    greeting = decode_answer(flow.response.content or b"") if flow.response.status_code == 101 else []
    if flow.response.status_code == 101:
        flow.response.content = b""
        flow.response.headers.pop("content-length", None)
        flow.response.headers["connection"] = "Upgrade"  # framing headers, which a replay leaves out
        flow.response.headers["upgrade"] = "websocket"
        flow.response.headers["sec-websocket-accept"] = accept(flow.request.headers.get("sec-websocket-key", ""))
    return greeting


def message_flow(upgrade: http.HTTPFlow, message: WebSocketMessage) -> http.HTTPFlow:
    """A client message as the request the lifecycle journals: `WS <url>`, the message its body."""
    req = upgrade.request
    text = message.is_text
    kind = "application/json" if text and message.content.lstrip()[:1] in (b"{", b"[") else "text/plain"
    headers = http.Headers(content_type=f"{kind}; charset=utf-8" if text else "application/octet-stream")
    request = http.Request(
        req.host,
        req.port,
        METHOD.encode(),
        req.scheme.encode(),
        b"",
        req.path.encode(),
        b"HTTP/1.1",
        headers,
        message.content,
        None,
        time.time(),
        time.time(),
    )
    # not connected until the message leaves: should journaling fail first, it provably never did
    return flow_of(upgrade.client_conn, connection.Server(address=upgrade.server_conn.address), request)


def flow_of(client: connection.Client, server: connection.Server, request: http.Request) -> http.HTTPFlow:
    flow = http.HTTPFlow(client, server)
    flow.request = request
    return flow


@dataclass
class Open:
    """The step whose answer is arriving."""

    step: Step
    flow: http.HTTPFlow
    frames: list[Frame] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    size: int = 0  # bytes of the frames
    rewritten: int = 0  # bytes of answer written so far, message by message (REWRITE_BUDGET)
    over_cap: bool = False  # past durable_body_cap: the rest streams through, the step stays in doubt
    due: bool = False  # a message of it waits for the commit that journals the answer
    ended: bool = False  # its end marker came: what follows joins it, journaled before delivery

    def add(self, content: bytes, text: bool) -> Frame:
        frame = Frame((time.monotonic() - self.started) * 1000, content, text)
        self.frames.append(frame)
        self.size += len(content)
        return frame

    def drop(self) -> None:
        """Past the cap: nothing of it is kept in memory any more."""
        self.frames, self.over_cap = [], True


Inject = Callable[[http.HTTPFlow, bytes, bool], None]
HangUp = Callable[[http.HTTPFlow, int, str], None]
Report = Callable[[http.HTTPFlow, Step], None]


class Conversation:
    """One WebSocket connection of a run."""

    def __init__(
        self,
        flow: http.HTTPFlow,
        ident: identity.Identity,
        lifecycle: Lifecycle,
        inject: Inject,
        hang_up: HangUp,
        report: Report,
        handshake: Step | None,
        greeting: list[Frame],
    ) -> None:
        self.flow, self.lifecycle, self.inject, self.hang_up, self.report = flow, lifecycle, inject, hang_up, report
        self.closed_here = False  # the sidecar closed the conversation: its close is not the server's
        self.ident = dataclasses.replace(ident, step_key=None)  # a step key names the handshake, not each message
        self.native = handshake is not None  # mitmproxy holds the upstream connection
        self.upstream: Upstream | None = None
        self.open: Open | None = None
        if handshake is not None:  # journaled with its greeting at the first client message or the close
            handshake_flow = flow_of(flow.client_conn, flow.server_conn, flow.request)
            handshake_flow.response = flow.response.copy() if flow.response else None
            self.open = Open(handshake, handshake_flow, started=handshake.started)
        self.last: Open | None = None  # the answer last journaled, while pushes may follow it
        self.replayed: list[ws_resume.Replayed] = []  # client messages answered from the journal here
        self.went_live = False  # a message of this conversation was sent upstream
        self.resyncing: asyncio.Queue[tuple[bytes, bool]] | None = None  # answers to re-sent messages
        self.turn = asyncio.Lock()  # the upstream's reader and mitmproxy's hooks take turns
        self.pushes: list[Frame] = []  # messages after the last journaled answer, due to join it
        self.committing = asyncio.Lock()  # one commit of due messages at a time
        self.outbox: list[tuple[bytes, bool]] = []  # the sidecar's own upstream: messages to deliver, in order
        self.flusher: asyncio.Task[None] | None = None  # journals the outbox's due messages, then delivers them
        for frame in greeting:
            self.inject(flow, frame.content, frame.text)

    async def client_message(self, message: WebSocketMessage) -> None:
        """Journal the message before it may leave; answer it from the journal if it was."""
        async with self.turn:
            await self._client_message(message)

    async def _client_message(self, message: WebSocketMessage) -> None:
        if self.closed_here:  # sent before the agent saw the close: never journaled, never sent
            message.drop()
            return
        if not await self._drained():
            message.drop()
            return
        await self._end_answer(complete=True)
        fake = message_flow(self.flow, message)
        try:
            step = await self.lifecycle.begin(fake, self.ident)
        except (Refused, JournalError) as e:
            self._refuse(message, getattr(e, "reason", str(e)), getattr(e, "status", 503))
            return
        if not step.live:
            message.drop()
            assert fake.response is not None
            body = fake.response.content or b""
            if fake.response.headers.get("content-type") != CONTENT_TYPE:  # a journaled failure, replayed
                self.report(fake, step)
                self._close(
                    ws_close.code_for(fake.response.status_code), "a journaled failure of this message, replayed"
                )
                return
            frames = decode_answer(body)
            for frame in frames:
                self.inject(self.flow, frame.content, frame.text)
            self.replayed.append(
                ws_resume.Replayed(message.content, message.is_text, len(frames), has_end(message.content))
            )
            self.report(fake, step)
            if (closed := decode_close(body)) is not None:  # the server closed here: so does the replay
                self._close(closed.code, closed.reason)
            return
        self.open = Open(step, fake)
        resume = "live" if self.went_live else self._resume_policy(message.content)
        if resume == "close":
            message.drop()
            await self._end_answer(complete=False, error="never sent: a resumed conversation (durable_ws_resume)")
            self._close(ws_resume.GONE, ws_resume.refusal(len(self.replayed)))
            return
        self.went_live = True
        if not self.native:
            message.drop()
            try:
                if self.upstream is None:
                    self.upstream = await Upstream.open(self.flow, self._upstream_message, self._upstream_closed)
                    if resume == "resend":
                        await self._resend(self.upstream)
                fake.server_conn.timestamp_tcp_setup = time.time()
                await self.upstream.send(message.content, message.is_text)
            except OSError as e:
                await self._end_answer(complete=False, error=f"upstream WebSocket: {e}")
                self._close(ws_close.code_for(502), f"the upstream WebSocket could not be reached: {e}")
                return
        fake.server_conn.timestamp_tcp_setup = time.time()  # it leaves as this hook returns

    def _resume_policy(self, message: bytes) -> str:
        """What the first message to go live does after replayed ones (ws_resume.py): live, close or
        resend; mitmproxy's own upstream connection (a live handshake) cannot be re-sent on: close."""
        policy = self.lifecycle.settings.ws_resume_policy(self.flow.request.host)
        action = ws_resume.decide(policy, self.replayed, message)
        if action != "live":
            logger.warning(
                "durable: run=%s attempt=%s WebSocket to %s resumed after %d replayed messages: %s "
                "(durable_ws_resume=%s)",
                self.ident.run,
                self.ident.attempt,
                self.flow.request.pretty_host,
                len(self.replayed),
                "their messages re-sent on the new upstream" if action == "resend" and not self.native else "closed",
                policy,
            )
        return "close" if action == "resend" and self.native else action

    async def _resend(self, upstream: Upstream) -> None:
        """Bring the new upstream to the state the agent believes in (ws_resume.resend)."""
        self.resyncing = asyncio.Queue()
        try:
            await ws_resume.resend(
                upstream,
                self.replayed,
                self.resyncing,
                lambda request, content, text: ends(request, Frame(0, content, text)),
            )
        finally:
            self.resyncing = None

    async def server_message(self, message: WebSocketMessage) -> None:
        """A server message through mitmproxy's own upstream connection: delivered at once, or (due)
        after the commit that ws_batch.py asks for once the read is handled, or dropped."""
        verdict = self._note(message.content, message.is_text)
        if verdict == "due" and ws_batch.installed:
            self.flow.metadata[ws_batch.DUE] = True
        elif verdict == "due" and not await self._commit_due():
            message.drop()
            self._close(ws_close.code_for(503), UNJOURNALED)
        elif verdict == "refused":
            message.drop()
            self._close(ws_close.code_for(503), UNJOURNALED)

    async def commit(self) -> None:
        """The messages of one read noted as due are journaled now (ws_batch.py); if they cannot be,
        none of them reaches the agent and the conversation is closed."""
        if not await self._commit_due():
            self.flow.metadata[ws_batch.REFUSED] = True
            self._close(ws_close.code_for(503), UNJOURNALED)

    async def _upstream_message(self, content: bytes, text: bool) -> None:
        """A server message on the upstream this sidecar opened after a replay: delivered by the
        flusher, after the commit that journals it and the messages read with it."""
        if self.resyncing is not None:  # the answer to a re-sent message: the agent had it replayed
            self.resyncing.put_nowait((content, text))
            return
        async with self.turn:
            verdict = self._note(content, text)
        if verdict == "refused":
            self._close(ws_close.code_for(503), UNJOURNALED)
        elif verdict == "now" and not self.outbox and not self.committing.locked():
            self.inject(self.flow, content, text)
        else:
            self.outbox.append((content, text))
            if self.flusher is None or self.flusher.done():
                self.flusher = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        """Deliver the outbox, each batch after the commit that journals it (messages read meanwhile
        wait for the next one: a burst costs one commit)."""
        while self.outbox and not self.closed_here:
            sending, self.outbox = self.outbox, []
            if not await self._commit_due():
                self.outbox = []
                self._close(ws_close.code_for(503), UNJOURNALED)
                return
            for content, text in sending:
                self.inject(self.flow, content, text)

    async def _drained(self) -> bool:
        """Every server message read so far journaled (and, on the sidecar's own upstream, delivered);
        False if the journal refused them (the conversation is closed)."""
        if self.flusher is not None:
            await asyncio.shield(self.flusher)
        return not self.closed_here and await self._commit_due()

    async def _upstream_closed(self, code: int | None, reason: str) -> None:
        """The server closed the upstream this sidecar opened: its close reaches the agent."""
        closed = sendable(code, reason)
        async with self.turn:
            if await self._drained():
                await self._end_answer(complete=True, closed=closed)
        self._close(closed.code, closed.reason)

    def _note(self, content: bytes, text: bool) -> str:
        """Add a server message to the answer arriving (or, after it was journaled, to its pushes).
        `now`: it may reach the agent at once (a known end is still to come, and an exchange broken
        before it leaves the step in doubt, as a cut HTTP stream does; or it streams through past the
        cap). `due`: only once journaled (_commit_due). `refused`: never (nothing to join it to)."""
        answer = self.open
        if answer is None:  # after its answer was journaled (or while it is): it joins that answer
            if self.last is not None and self.last.over_cap:
                return "now"
            if self.last is None and not self.committing.locked():
                return "refused"
            self.pushes.append(Frame(0.0, content, text))
            return "due"
        if answer.over_cap:
            return "now"
        frame = answer.add(content, text)
        if answer.size > self.lifecycle.settings.body_cap:
            self._over_cap(answer)
            return "now"
        request = answer.flow.request.content or b""
        if answer.flow.request.method == METHOD and has_end(request) and not answer.ended:
            if not ends(request, frame):
                return "now"
            answer.ended = True
        answer.due = True
        return "due"

    async def _commit_due(self) -> bool:
        """Journal what is due: the answer that waits for it (completing its step) and the messages
        that joined the last journaled answer, in one commit each at most. False if not journaled."""
        async with self.committing:
            pushes, self.pushes = self.pushes, []
            if self.open is not None and self.open.due and not await self._end_answer(complete=True):
                return False
            return await self._append(pushes) if pushes else True

    async def _append(self, pushes: list[Frame]) -> bool:
        """Messages after the answer they follow was journaled: appended to that step's answer.
        Those that take the answer past durable_body_cap take the step back into doubt
        (journal.take_back) and stream through, as the rest of that answer does."""
        last = self.last
        if last is not None and last.over_cap:
            return True
        if last is None or last.step.run is None or last.step.seq is None:
            return False
        grown = last.size + sum(len(frame.content) for frame in pushes)
        if grown > self.lifecycle.settings.body_cap or last.rewritten + grown > REWRITE_BUDGET:
            try:
                await self.lifecycle.journal.take_back(last.step.run, last.step.seq)
            except JournalError as e:
                logger.error(
                    "durable: run=%s seq=%s answer past the cap not taken back: %s", last.step.run, last.step.seq, e
                )
                return False
            if last.step.cursor is not None:
                last.step.cursor.mark(last.step.seq, "pending")
            self._over_cap(last)
            return True
        if not await self._rewrite_last([*last.frames, *pushes]):
            return False
        last.size = grown
        last.rewritten += grown
        return True

    def _over_cap(self, answer: Open) -> None:
        answer.drop()
        logger.warning(
            "durable: run=%s seq=%s WebSocket answer over durable_body_cap (or, with no end marker, past the "
            "rewriting budget): streamed through, not journaled; "
            "the step stays in doubt and a later attempt re-sends it",
            answer.step.run,
            answer.step.seq,
        )

    async def _rewrite_last(self, frames: list[Frame], closed: Close | None = None) -> bool:
        """The answer last journaled, grown to `frames` (and the server's close); False if not journaled."""
        last = self.last
        if last is None or last.over_cap or last.step.run is None or last.step.seq is None:
            return False
        try:
            await self.lifecycle.journal.append_answer(last.step.run, last.step.seq, encode_answer(frames, closed))
        except JournalError as e:
            logger.error("durable: run=%s seq=%s server message not journaled: %s", last.step.run, last.step.seq, e)
            return False
        last.frames = frames
        return True

    async def ended(self) -> None:
        """The connection closed: the answer in hand is complete unless the agent's end died."""
        ws = self.flow.websocket
        died = ws is not None and ws.closed_by_client and ws.close_code == ABNORMAL
        if self.upstream is not None:
            await self.upstream.close()
        if self.flusher is not None:  # journaled; the agent that closed no longer takes them
            await asyncio.shield(self.flusher)
        await self._commit_due()
        by_server = ws is not None and not ws.closed_by_client and not self.closed_here
        await self._end_answer(
            complete=not died,
            closed=sendable(ws.close_code, ws.close_reason or "") if by_server and ws is not None else None,
            error="the agent's connection died mid-answer",
        )

    async def _end_answer(self, complete: bool, closed: Close | None = None, error: str = "") -> bool:
        """Journal the open answer (or, in doubt, leave it); True if journaled or nothing was open.
        A close with nothing open is journaled with the answer it follows."""
        current, self.open = self.open, None
        if current is None:
            if closed is not None and self.last is not None:
                await self._rewrite_last(self.last.frames, closed)
            return True
        fake, step = current.flow, current.step
        if current.over_cap:  # streamed through: in doubt, as a too-big HTTP answer is
            complete, error = False, "answer over durable_body_cap"
        body = encode_answer(current.frames, closed)
        if fake.response is not None and fake.response.status_code == 101:  # the handshake's answer
            fake.response.content = body
        else:
            fake.response = http.Response.make(200, body, {"content-type": CONTENT_TYPE})
        self.last = None  # until this answer is journaled, nothing may be appended to an earlier one
        try:
            if complete:
                await self.lifecycle.finish(fake, step)
                self.last = current
            else:
                fake.response = None
                await self.lifecycle.break_off(fake, step, error)
        except AnswerHeld:
            return True  # held and journaled once the journal is back: the agent may have it
        except Exception as e:
            logger.error("durable: run=%s seq=%s WebSocket answer not journaled: %s", step.run, step.seq, e)
            step.outcome = "refused"
            return False
        if fake.request.method == METHOD:
            self.report(fake, step)
        return True

    def _refuse(self, message: WebSocketMessage, reason: str, status: int) -> None:
        """Nothing unjournaled leaves: the message is dropped and the connection closed, with the
        close code 4000 + the HTTP status the same refusal gets (ws_close.py)."""
        code = ws_close.code_for(status)
        logger.warning(
            "durable: refused run=%s attempt=%s WebSocket message to %s: %s; the connection is closed (%d)",
            self.ident.run,
            self.ident.attempt,
            self.flow.request.pretty_host,
            reason,
            code,
        )
        message.drop()
        self._close(code, reason)

    def _close(self, code: int, reason: str) -> None:
        """The agent's connection closed by the sidecar, once (the upstream's too, if mitmproxy holds it)."""
        if not self.closed_here:
            self.closed_here = True
            self.hang_up(self.flow, code, reason)
