"""Server messages journaled in one commit per read, and delivered only after it.

A WebSocket answer with no end marker is journaled before each of its messages reaches the agent.
One commit per message would make a burst (a hundred deltas in one read) cost a hundred commits;
here it costs one. mitmproxy's WebSocket layer handles every message in one read of the upstream
before it reads again: the sidecar's `websocket_message` hook only takes note of a server message
that must be journaled first (conversations.py marks the flow `DUE`), and this wrapper holds back
everything the layer would send from that message on (its frames, the messages after it, a close
the server sent in the same read, the end hook). When the read is handled, one `durable_websocket_commit`
hook journals what is due; then what was held goes out in its order, or, if the journal refused it,
nothing of it reaches the agent and the conversation closes with 4503.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from mitmproxy import http
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers.websocket import WebsocketLayer, WebsocketMessageHook

from .patching import wrap_once

DUE = "durable_ws_due"  # flow.metadata: a server message of this read waits for a commit
REFUSED = "durable_ws_refused"  # flow.metadata: the commit failed; what was held is not delivered
installed = False  # else a due message is journaled in its own hook, one commit each


@dataclass
class WebsocketCommitHook(commands.StartHook):
    """Journal the server messages noted as due in this read (DurableSidecar.durable_websocket_commit)."""

    flow: http.HTTPFlow
    name: ClassVar[str] = "durable_websocket_commit"


def install() -> bool:
    """Wrap the layer's relay so a read's due messages cost one commit, and leave only after it."""

    def wrap_relay(original: Any) -> Any:
        def relay_messages(self: Any, event: Any) -> Any:
            if not (isinstance(event, events.ConnectionEvent) and event.connection == self.context.server):
                yield from original(self, event)
                return
            held: list[commands.Command] | None = None  # from the first due message on
            relay = original(self, event)
            reply = None
            while True:
                try:
                    command = relay.send(reply)
                except StopIteration:
                    break
                if held is not None and not isinstance(command, WebsocketMessageHook):
                    held.append(command)  # a blocking command held back is answered later, with None as ever
                    reply = None
                    continue
                reply = yield command
                if isinstance(command, WebsocketMessageHook) and self.flow.metadata.pop(DUE, False):
                    held = [] if held is None else held
            if held is None:
                return
            yield WebsocketCommitHook(self.flow)
            refused = self.flow.metadata.pop(REFUSED, False)
            for command in held:
                if refused and isinstance(command, commands.SendData) and command.connection == self.context.client:
                    continue  # not journaled: the agent must not have it (the sidecar closes the conversation)
                yield command

        return relay_messages

    global installed
    installed = wrap_once(WebsocketLayer, "relay_messages", wrap_relay)
    return installed
