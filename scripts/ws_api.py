#!/usr/bin/env python3
"""A local WebSocket "paid API" for the tests: it bills every client message it answers.

Paths (ws:// or, with a TLS directory, wss://):
  /v1/responses   the Responses API over WebSocket: a `response.create` message is answered with
                  `response.created`, two `response.output_text.delta` and `response.completed`
                  (with usage); `"x_delay_ms": N` in the message waits N ms before the last event.
                  Each answer's text names the ledger's call number, so a second charge shows.
  /rpc            JSON-RPC 2.0: a request is answered with {"result": {"echo": params, "call": N}}
  /echo           any message is echoed back with its call number (no end marker); after the
                  message "close" (or "close CODE") the server closes the connection (1000, or CODE);
                  "blob N SIZE" is answered with N binary messages of SIZE bytes; "burst N [CODE]" with
                  N text messages back to back (a read holds many), then a close with CODE if given;
                  "wait MS" is echoed MS ms after it was booked
  /greet          as /echo, after a greeting sent on connect
  /sum            state per connection, as a Realtime session keeps it: "add N" is answered with the
                  connection's running total, "total T" (and a JSON-RPC request {"method": "add",
                  "params": {"n": N}} with {"result": {"total": T}})
Ledger: `ledger()` in-process, or GET /_books (HTTP, not WebSocket) when run as a script.

Run: python scripts/ws_api.py --port 0 --port-file PORT [--tls-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import threading
from pathlib import Path
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

sys.path.insert(0, str(Path(__file__).parent))
from paid_api import ensure_tls  # noqa: E402


class Ledger:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.connections = 0
        self.calls = 0
        self.messages: list[str] = []

    def book(self, message: str) -> int:
        with self.lock:
            self.calls += 1
            self.messages.append(message)
            return self.calls

    def books(self) -> dict[str, Any]:
        with self.lock:
            return {"connections": self.connections, "calls": self.calls, "messages": list(self.messages)}


LEDGER = Ledger()


def _responses(call: int, doc: dict[str, Any]) -> list[dict[str, Any]]:
    text = f"answer {call} to {json.dumps(doc.get('input'))[:60]}"
    response = {"id": f"resp_{call}", "object": "response", "status": "in_progress", "model": doc.get("model", "m")}
    done = {
        **response,
        "status": "completed",
        "output": [
            {
                "id": f"msg_{call}",
                "type": "message",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "usage": {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15},
    }
    return [
        {"type": "response.created", "response": response},
        {"type": "response.output_text.delta", "delta": text[:6], "item_id": f"msg_{call}", "output_index": 0},
        {"type": "response.output_text.delta", "delta": text[6:], "item_id": f"msg_{call}", "output_index": 0},
        {"type": "response.completed", "response": done},
    ]


async def handler(ws: ServerConnection) -> None:
    with LEDGER.lock:
        LEDGER.connections += 1
    path = ws.request.path.split("?")[0] if ws.request else ""
    total = 0  # /sum: this connection's state
    if path == "/greet":
        await ws.send(json.dumps({"type": "hello", "server": "ws_api"}))
    async for message in ws:
        text = message if isinstance(message, str) else message.decode("utf-8", "replace")
        call = LEDGER.book(text)
        if path == "/v1/responses":
            doc = json.loads(text)
            events = _responses(call, doc)
            for event in events[:-1]:
                await ws.send(json.dumps(event))
            await asyncio.sleep(doc.get("x_delay_ms", 0) / 1000)
            await ws.send(json.dumps(events[-1]))
        elif path == "/sum":
            doc = json.loads(text) if text.startswith("{") else None
            total += int(doc["params"]["n"] if doc else text.split(" ")[1])
            answer = {"jsonrpc": "2.0", "id": doc["id"], "result": {"total": total}} if doc else None
            await ws.send(json.dumps(answer) if answer else f"total {total}")
        elif path == "/rpc":
            doc = json.loads(text)
            if "id" in doc:
                result = {"echo": doc.get("params"), "call": call}
                await ws.send(json.dumps({"jsonrpc": "2.0", "id": doc["id"], "result": result}))
        else:
            if text.startswith("blob "):  # "blob N SIZE": N binary messages of SIZE bytes
                count, size = (int(x) for x in text.split()[1:3])
                for n in range(count):
                    await ws.send(bytes([n % 256]) * size)
                continue
            if text.startswith("burst "):  # "burst N [CODE]": N messages back to back, then maybe a close
                words = text.split()
                for n in range(int(words[1])):
                    await ws.send(f"part {n} of {text}")
                if len(words) > 2:
                    await ws.close(int(words[2]), "after a burst")
                continue
            if text.startswith("wait "):  # "wait MS": booked, then echoed MS ms later
                await asyncio.sleep(int(text.split()[1]) / 1000)
            await ws.send(f"echo {call}: {text}")
            if text.split(" ")[0] == "close":  # "close" or "close CODE"
                await ws.close(int(text.split(" ")[1]) if " " in text else 1000, "asked to")


def books_route(connection: ServerConnection, request: Request) -> Response | None:
    if request.path == "/_books":
        body = json.dumps(LEDGER.books()).encode()
        return Response(200, "OK", Headers([("Content-Type", "application/json")]), body)
    return None


def server_context(tls_dir: Path) -> ssl.SSLContext:
    """TLS with the certificate paid_api.py makes (its CA is the one the sidecars trust)."""
    cert, key = ensure_tls(tls_dir)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


class Server:
    """The API on a thread of its own (for tests in one process)."""

    def __init__(self, tls_dir: Path | None = None) -> None:
        self.context = server_context(tls_dir) if tls_dir is not None else None
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> Any:
        server = await serve(handler, "127.0.0.1", 0, ssl=self.context, process_request=books_route)
        self.port = server.sockets[0].getsockname()[1]
        return server

    @property
    def url(self) -> str:
        return f"{'wss' if self.context else 'ws'}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.close()
        self.loop.call_soon_threadsafe(self.loop.stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file")
    parser.add_argument("--tls-dir")
    args = parser.parse_args()

    async def run() -> None:
        context = server_context(Path(args.tls_dir)) if args.tls_dir else None
        async with serve(handler, "127.0.0.1", args.port, ssl=context, process_request=books_route) as server:
            port = server.sockets[0].getsockname()[1]
            if args.port_file:
                Path(args.port_file).write_text(str(port))
            await server.serve_forever()

    asyncio.run(run())


if __name__ == "__main__":
    main()
