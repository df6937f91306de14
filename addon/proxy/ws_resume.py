"""A resumed WebSocket conversation going live on a new upstream connection (durable_ws_resume).

On resume the first messages of a conversation are answered from the journal with no upstream
connection; the first message the journal does not know opens a new one. A server that keeps
state per connection (a running total, a Realtime session, a cart) has never seen the replayed
messages on it, so its answer would be made without the state the agent believes in: a silent
wrong answer. What the sidecar does then, per host:

- `auto` (the default): live when the message carries its own state (a Responses API
  `response.create`, unless it continues a previous response the server stored only on that
  connection, `store: false`; not the Realtime API's, whose session is the connection), `close`
  otherwise.
- `live`: the new connection as it is (for servers that keep nothing per connection).
- `close`: the agent's connection is closed with 4410 and a reason naming this option; the
  message is journaled as never sent (`failed`), nothing is charged.
- `resend`: the replayed messages are sent again on the new connection, in order, and their
  answers swallowed (to the end marker, or as many messages as the journal holds for each), so
  the server reaches the state the agent believes in; then the new message goes live. It costs
  what those messages cost again, at the upstream's prices.

With no message replayed on the connection (only its handshake), a new connection is in the
state the agent believes in, and the message always goes live.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..matching import bodies

logger = logging.getLogger("durable")

GONE = 4410  # 4000 + HTTP's 410 Gone: the conversation's state upstream is gone
ANSWER_WAIT_S = 30.0  # how long a re-sent message's answer may take


@dataclass(frozen=True)
class Replayed:
    """A client message answered from the journal on this connection, and what its answer was."""

    content: bytes
    text: bool
    answer_messages: int  # server messages the journal holds for it
    has_end: bool  # its answer ends at a marker (conversations.has_end)


class Sender(Protocol):
    async def send(self, content: bytes, text: bool) -> None: ...


def self_contained(message: bytes) -> bool:
    """Does this client message carry all the state its answer needs? A Responses API
    `response.create` does (its input, or a `previous_response_id` the server stores by id), unless
    it continues a response kept only on the connection it was made on (`store: false`). The
    Realtime API's `response.create` (its fields under `response`) answers from the session the
    connection holds: it does not."""
    doc = bodies.json_object(message)
    if doc is None or doc.get("type") != "response.create" or "response" in doc:
        return False
    return not (doc.get("previous_response_id") and doc.get("store") is False)


def decide(policy: str, replayed: list[Replayed], message: bytes) -> str:
    """live, close or resend, for a message that must go live on a new upstream connection."""
    if not replayed:
        return "live"
    if policy == "auto":
        return "live" if self_contained(message) else "close"
    return policy


def refusal(replayed: int) -> str:
    """Why a resumed conversation was closed, short enough for a close frame's reason."""
    return f"resumed after {replayed} replayed messages: a new upstream lacks their state (durable_ws_resume)"


async def resend(
    upstream: Sender,
    replayed: list[Replayed],
    answers: asyncio.Queue[tuple[bytes, bool]],
    ends: Callable[[bytes, bytes, bool], bool],
) -> None:
    """Send the replayed messages again on `upstream`, each after the last one's answer is in;
    raises OSError when an answer does not come as the journal has it."""
    for n, sent in enumerate(replayed, 1):
        await upstream.send(sent.content, sent.text)
        got = 0
        while got < sent.answer_messages or sent.has_end:
            try:
                content, text = await asyncio.wait_for(answers.get(), ANSWER_WAIT_S)
            except TimeoutError as e:
                raise OSError(
                    f"re-sent message {n} of {len(replayed)} got {got} answers in {ANSWER_WAIT_S:.0f} s"
                ) from e
            got += 1
            if sent.has_end and ends(sent.content, content, text):
                break
    logger.warning(
        "durable: %d replayed WebSocket messages re-sent on the new upstream (durable_ws_resume=resend)", len(replayed)
    )
