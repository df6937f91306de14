#!/usr/bin/env python3
"""A local fake LLM for the compatibility suite: OpenAI Chat Completions, the Responses API (HTTP,
streamed or not, and over WebSocket) and Anthropic Messages, each playing one tool-using turn.

Every model call is billed. A conversation with no tool result yet is answered with a call of the
tool `charge` (`{"amount": 3}`); once a tool result is in it, with the final text `done: <result>
(model call N)`, N the ledger's count, so a model call made twice shows in the agent's output.

Run: python scripts/fake_llm.py --port-file PORT [--tls-dir DIR]   (GET /_books: the ledger)
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

sys.path.insert(0, str(Path(__file__).parent))
from paid_api import ensure_tls  # noqa: E402

LOCK = threading.Lock()
BOOKS: dict[str, int] = {"calls": 0}
TOOL = {"name": "charge", "arguments": {"amount": 3}}


def bill(kind: str) -> int:
    with LOCK:
        BOOKS["calls"] += 1
        BOOKS[kind] = BOOKS.get(kind, 0) + 1
        return BOOKS["calls"]


def final_text(result: str, n: int) -> str:
    return f"done: {result} (model call {n})"


# -- Chat Completions ------------------------------------------------------------------------------


def chat(doc: dict[str, Any], n: int) -> dict[str, Any]:
    results = [m for m in doc.get("messages", []) if m.get("role") == "tool"]
    if results:
        message: dict[str, Any] = {"role": "assistant", "content": final_text(str(results[-1]["content"]), n)}
        finish = "stop"
    else:
        call = {"id": "call_1", "type": "function",
                "function": {"name": TOOL["name"], "arguments": json.dumps(TOOL["arguments"])}}
        message, finish = {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
    return {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": 1_700_000_000 + n,
            "model": doc.get("model", "m"), "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 10, "total_tokens": 30}}


async def chat_completions(request: Request) -> Response:
    doc = await request.json()
    answer = chat(doc, bill("chat"))
    if not doc.get("stream"):
        return JSONResponse(answer)
    message = answer["choices"][0]["message"]
    delta: dict[str, Any] = {"role": "assistant", "content": message["content"]}
    if "tool_calls" in message:
        delta["tool_calls"] = [{"index": 0, **message["tool_calls"][0]}]
    chunks = [
        {**answer, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
        {**answer, "object": "chat.completion.chunk",
         "choices": [{"index": 0, "delta": {}, "finish_reason": answer["choices"][0]["finish_reason"]}]},
    ]
    events = [f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]
    return StreamingResponse(iter(events), media_type="text/event-stream")


# -- the Responses API ------------------------------------------------------------------------------


def response(doc: dict[str, Any], n: int) -> dict[str, Any]:
    items = doc.get("input") if isinstance(doc.get("input"), list) else []
    results = [i for i in items if isinstance(i, dict) and i.get("type") == "function_call_output"]
    if results:
        output: dict[str, Any] = {
            "id": f"msg_{n}", "type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": final_text(str(results[-1]["output"]), n), "annotations": []}],
        }
    else:
        output = {"id": f"fc_{n}", "type": "function_call", "call_id": "call_1", "name": TOOL["name"],
                  "arguments": json.dumps(TOOL["arguments"]), "status": "completed"}
    return {
        "id": f"resp_{n}", "object": "response", "created_at": 1_700_000_000 + n, "model": doc.get("model", "m"),
        "status": "completed", "output": [output], "parallel_tool_calls": True, "tool_choice": "auto",
        "tools": doc.get("tools", []),
        "usage": {"input_tokens": 20, "output_tokens": 10, "total_tokens": 30,
                  "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}},
    }


def response_events(answer: dict[str, Any]) -> list[dict[str, Any]]:
    created = {**answer, "status": "in_progress", "output": []}
    item = answer["output"][0]
    return [
        {"type": "response.created", "sequence_number": 0, "response": created},
        {"type": "response.output_item.added", "sequence_number": 1, "output_index": 0, "item": item},
        {"type": "response.output_item.done", "sequence_number": 2, "output_index": 0, "item": item},
        {"type": "response.completed", "sequence_number": 3, "response": answer},
    ]


async def responses(request: Request) -> Response:
    doc = await request.json()
    answer = response(doc, bill("responses"))
    if not doc.get("stream"):
        return JSONResponse(answer)
    events = [f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in response_events(answer)]
    return StreamingResponse(iter(events), media_type="text/event-stream")


async def responses_websocket(ws: WebSocket) -> None:
    await ws.accept()
    try:
        while True:
            doc = json.loads(await ws.receive_text())
            for event in response_events(response(doc, bill("responses_ws"))):
                await ws.send_text(json.dumps(event))
    except WebSocketDisconnect:
        pass


# -- Anthropic Messages -----------------------------------------------------------------------------


async def messages(request: Request) -> Response:
    doc = await request.json()
    n = bill("messages")
    results = [
        block for m in doc.get("messages", []) if m.get("role") == "user" and isinstance(m.get("content"), list)
        for block in m["content"] if block.get("type") == "tool_result"
    ]
    if results:
        content = results[-1]["content"]
        text = content if isinstance(content, str) else " ".join(b.get("text", "") for b in content)
        blocks: list[dict[str, Any]] = [{"type": "text", "text": final_text(text, n)}]
        stop = "end_turn"
    else:
        blocks, stop = [{"type": "tool_use", "id": "toolu_1", "name": TOOL["name"], "input": TOOL["arguments"]}], "tool_use"
    return JSONResponse({"id": f"msg_{n}", "type": "message", "role": "assistant", "model": doc.get("model", "m"),
                         "content": blocks, "stop_reason": stop, "stop_sequence": None,
                         "usage": {"input_tokens": 20, "output_tokens": 10}})


async def books(request: Request) -> Response:
    with LOCK:
        return JSONResponse(dict(BOOKS))


async def reset(request: Request) -> Response:
    with LOCK:
        BOOKS.clear()
        BOOKS["calls"] = 0
    return JSONResponse({"reset": True})


APP = Starlette(routes=[
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/responses", responses, methods=["POST"]),
    WebSocketRoute("/v1/responses", responses_websocket),
    Route("/v1/messages", messages, methods=["POST"]),
    Route("/_books", books),
    Route("/_reset", reset, methods=["POST"]),
])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--tls-dir")
    args = parser.parse_args()
    tls: dict[str, Any] = {}
    if args.tls_dir:
        cert, key = ensure_tls(Path(args.tls_dir))
        tls = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    config = uvicorn.Config(APP, host="127.0.0.1", port=0, log_level="warning", ws="websockets", **tls)
    server = uvicorn.Server(config)

    def announce() -> None:  # the port the OS picked, once the server listens
        while not server.started:
            time.sleep(0.02)
        Path(args.port_file).write_text(str(server.servers[0].sockets[0].getsockname()[1]))

    threading.Thread(target=announce, daemon=True).start()
    server.run()


if __name__ == "__main__":
    main()
