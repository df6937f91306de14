"""What a step says in the OpenTelemetry GenAI semantic conventions, read from its bodies.

Read from the request: the operation and provider (by path and host), `gen_ai.request.model`,
`.temperature`, `.top_p`, `.max_tokens` (`max_tokens`, `max_completion_tokens` or
`max_output_tokens`), `.seed`. Read from the answer (a JSON body, a stream's events, a WebSocket
answer's messages): `gen_ai.response.model`, `.id`, `.finish_reasons`, `gen_ai.usage.input_tokens`,
`.output_tokens`, the cached and reasoning token counts, and the tools the model asked for. Shapes:
OpenAI Chat Completions (`choices`, `usage.prompt_tokens`...), the Responses API (`response.*`
events, a `response` object), Anthropic Messages (`message_start`, `message_delta`, `stop_reason`).
MCP's `tools/call` is an `execute_tool` operation. Contents (`gen_ai.input.messages`,
`gen_ai.system_instructions`, `gen_ai.output.messages`, in the conventions' parts structure) only
when the caller asks (tracing.py: the conventions' own opt-in), from a request already redacted.
"""

from __future__ import annotations

import json
from typing import Any

from . import usage

Attributes = dict[str, Any]

OPENAI_PATHS = ("/chat/completions", "/responses", "/completions", "/embeddings")


def request_doc(body: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def operation(method: str, host: str, path: str, doc: dict[str, Any] | None) -> tuple[str, str] | None:
    """(gen_ai.operation.name, gen_ai.provider.name) of an LLM call or an MCP tool call; None otherwise."""
    path = path.split("?")[0].rstrip("/")
    if doc is not None and doc.get("jsonrpc") == "2.0" and doc.get("method") == "tools/call":
        return "execute_tool", "mcp"
    if method == "WS" and doc is not None and doc.get("type") == "response.create":
        return "chat", "openai"
    if method != "POST" or doc is None or "model" not in doc:
        return None
    if path.endswith("/messages") and ("anthropic" in host or "anthropic_version" in doc or "max_tokens" in doc):
        return "chat", "anthropic"
    if path.endswith("/embeddings"):
        return "embeddings", "openai"
    if path.endswith(("/chat/completions", "/responses")):
        return "chat", "openai"
    if path.endswith("/completions"):
        return "text_completion", "openai"
    return None


def request_attributes(op: str, provider: str, doc: dict[str, Any]) -> Attributes:
    attrs: Attributes = {"gen_ai.operation.name": op, "gen_ai.provider.name": provider}
    if op == "execute_tool":
        params: dict[str, Any] = doc["params"] if isinstance(doc.get("params"), dict) else {}
        attrs["mcp.method.name"] = doc.get("method")
        if isinstance(params.get("name"), str):
            attrs["gen_ai.tool.name"] = params["name"]
        if isinstance(doc.get("id"), str | int):
            attrs["jsonrpc.request.id"] = str(doc["id"])
        return attrs
    if doc.get("type") == "response.create" and isinstance(doc.get("response"), dict):
        doc = doc["response"]  # the Responses API over WebSocket: the request nested, or flat
    for name, keys in (
        ("gen_ai.request.model", ("model",)),
        ("gen_ai.request.temperature", ("temperature",)),
        ("gen_ai.request.top_p", ("top_p",)),
        ("gen_ai.request.max_tokens", ("max_tokens", "max_completion_tokens", "max_output_tokens")),
        ("gen_ai.request.seed", ("seed",)),
    ):
        for key in keys:
            value = doc.get(key)
            if isinstance(value, str | int | float) and not isinstance(value, bool):
                attrs[name] = value
                break
    return attrs


def _usage(counts: dict[str, Any], attrs: Attributes) -> None:
    """Usage counters, as running totals: the highest value of each wins."""

    def keep(name: str, value: Any) -> None:
        if isinstance(value, int) and not isinstance(value, bool):
            attrs[name] = max(attrs.get(name, 0), value)

    keep("gen_ai.usage.input_tokens", counts.get("prompt_tokens", counts.get("input_tokens")))
    keep("gen_ai.usage.output_tokens", counts.get("completion_tokens", counts.get("output_tokens")))
    for details, key, name in (
        ("prompt_tokens_details", "cached_tokens", "gen_ai.usage.cache_read.input_tokens"),
        ("input_tokens_details", "cached_tokens", "gen_ai.usage.cache_read.input_tokens"),
        ("completion_tokens_details", "reasoning_tokens", "gen_ai.usage.reasoning.output_tokens"),
        ("output_tokens_details", "reasoning_tokens", "gen_ai.usage.reasoning.output_tokens"),
    ):
        if isinstance(counts.get(details), dict):
            keep(name, counts[details].get(key))
    keep("gen_ai.usage.cache_read.input_tokens", counts.get("cache_read_input_tokens"))
    keep("gen_ai.usage.cache_creation.input_tokens", counts.get("cache_creation_input_tokens"))


def response_attributes(docs: list[Any]) -> Attributes:
    """What the answer's documents say, in order (a stream's later events refine the earlier)."""
    attrs: Attributes = {}
    finish: list[str] = []
    tools: list[tuple[str, str]] = []  # (name, call id)
    for doc in docs:
        if not isinstance(doc, dict):
            continue
        body = doc.get("response") or doc.get("message") or doc  # Responses events; Anthropic's message_start
        if not isinstance(body, dict):
            continue
        if isinstance(body.get("model"), str):
            attrs["gen_ai.response.model"] = body["model"]
        if isinstance(body.get("id"), str) and "gen_ai.response.id" not in attrs:
            attrs["gen_ai.response.id"] = body["id"]
        for holder in (body, doc):
            if isinstance(holder.get("usage"), dict):
                _usage(holder["usage"], attrs)
        for choice in body.get("choices") or []:  # Chat Completions (and each chunk of a stream)
            if not isinstance(choice, dict):
                continue
            if isinstance(choice.get("finish_reason"), str):
                finish.append(choice["finish_reason"])
            message = choice.get("message") or choice.get("delta") or {}
            for call in message.get("tool_calls") or [] if isinstance(message, dict) else []:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict) and isinstance(function.get("name"), str):
                    tools.append((function["name"], str(call.get("id") or "")))
        delta = doc.get("delta")  # Anthropic's message_delta: an object; the Responses API's deltas: text
        for reason in (body.get("stop_reason"), delta.get("stop_reason") if isinstance(delta, dict) else None):
            if isinstance(reason, str):  # Anthropic
                finish.append(reason)
        if doc.get("type") in ("response.completed", "response.incomplete", "response.failed"):
            if isinstance(body.get("status"), str):
                finish.append(body["status"])
        for item in body.get("output") or [] if doc.get("type") != "response.output_item.added" else []:
            if isinstance(item, dict) and item.get("type") == "function_call" and isinstance(item.get("name"), str):
                tools.append((item["name"], str(item.get("call_id") or "")))
        for block in body.get("content") or [] if isinstance(body.get("content"), list) else []:
            if isinstance(block, dict) and block.get("type") == "tool_use" and isinstance(block.get("name"), str):
                tools.append((block["name"], str(block.get("id") or "")))
        block = doc.get("content_block")
        if isinstance(block, dict) and block.get("type") == "tool_use" and isinstance(block.get("name"), str):
            tools.append((block["name"], str(block.get("id") or "")))
    if finish:
        attrs["gen_ai.response.finish_reasons"] = list(dict.fromkeys(finish))
    if tools:
        names = list(dict.fromkeys(name for name, _ in tools))
        attrs["durable.gen_ai.tool_calls"] = names
        if len(tools) == 1:
            attrs["gen_ai.tool.name"], call_id = tools[0]
            if call_id:
                attrs["gen_ai.tool.call.id"] = call_id
    return attrs


def _parts(content: Any) -> list[dict[str, Any]]:
    """A message's content as the conventions' parts: text, and tool calls or results by name."""
    if isinstance(content, str):
        return [{"type": "text", "content": content}]
    parts: list[dict[str, Any]] = []
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        if isinstance(block.get("text"), str):
            parts.append({"type": "text", "content": block["text"]})
        elif block.get("type") == "tool_use":
            parts.append({"type": "tool_call", "id": block.get("id"), "name": block.get("name")})
        elif block.get("type") == "tool_result":
            parts.append(
                {"type": "tool_call_response", "id": block.get("tool_use_id"), "response": block.get("content")}
            )
    return parts


def input_contents(doc: dict[str, Any]) -> Attributes:
    """The request's messages and system instructions (Chat Completions, Responses, Messages)."""
    if doc.get("type") == "response.create" and isinstance(doc.get("response"), dict):
        doc = doc["response"]
    messages = doc.get("messages") if isinstance(doc.get("messages"), list) else doc.get("input")
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    system: list[dict[str, Any]] = _parts(doc.get("system")) + _parts(doc.get("instructions"))
    out = []
    for message in messages if isinstance(messages, list) else []:
        if not isinstance(message, dict):
            continue
        if message.get("role") in ("system", "developer"):
            system += _parts(message.get("content"))
            continue
        parts = _parts(message.get("content"))
        for call in message.get("tool_calls") or []:
            if isinstance(call, dict) and isinstance(call.get("function"), dict):
                parts.append({"type": "tool_call", "id": call.get("id"), "name": call["function"].get("name")})
        out.append({"role": message.get("role") or message.get("type") or "user", "parts": parts})
    attrs: Attributes = {}
    if out:
        attrs["gen_ai.input.messages"] = json.dumps(out)
    if system:
        attrs["gen_ai.system_instructions"] = json.dumps(system)
    return attrs


def output_contents(docs: list[Any]) -> Attributes:
    """The answer's text (joined across a stream's deltas) as one assistant message."""
    text: list[str] = []
    for doc in docs:
        if not isinstance(doc, dict):
            continue
        for choice in doc.get("choices") or []:
            message = (choice.get("message") or choice.get("delta")) if isinstance(choice, dict) else None
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                text.append(message["content"])
        delta = doc.get("delta")
        if doc.get("type") == "response.output_text.delta" and isinstance(delta, str):
            text.append(delta)
        if isinstance(delta, dict) and isinstance(delta.get("text"), str):  # Anthropic's content_block_delta
            text.append(delta["text"])
        if doc.get("object") == "response" or "choices" not in doc and "type" not in doc:
            for item in doc.get("output") or [] if isinstance(doc.get("output"), list) else []:
                for part in item.get("content") or [] if isinstance(item, dict) else []:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        text.append(part["text"])
        if doc.get("type") == "message":  # Anthropic, not streamed
            text += [p["content"] for p in _parts(doc.get("content")) if p["type"] == "text"]
    if not text:
        return {}
    return {
        "gen_ai.output.messages": json.dumps(
            [{"role": "assistant", "parts": [{"type": "text", "content": "".join(text)}]}]
        )
    }


def attributes(
    method: str,
    host: str,
    path: str,
    request_body: bytes,
    response_body: bytes,
    response_headers: list[tuple[bytes, bytes]],
    contents: bool = False,
) -> tuple[str, Attributes] | None:
    """(span name, GenAI attributes) of an LLM or MCP tool call; None for any other step. With
    `contents`, the messages too (give a request already redacted)."""
    doc = request_doc(request_body)
    found = operation(method, host, path, doc)
    if found is None or doc is None:
        return None
    op, provider = found
    attrs = request_attributes(op, provider, doc)
    docs = usage.documents(response_body, response_headers) if response_body else []
    answer = response_attributes(docs)
    if op == "execute_tool":
        answer = {k: v for k, v in answer.items() if not k.startswith("gen_ai.tool")}
    attrs.update(answer)
    if contents and op == "chat":
        attrs.update(input_contents(doc))
        attrs.update(output_contents(docs))
    subject = attrs.get("gen_ai.tool.name") if op == "execute_tool" else attrs.get("gen_ai.request.model")
    return (f"{op} {subject}" if subject else op), attrs
