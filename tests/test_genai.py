"""matching/genai.py, pure logic: the GenAI attributes read from the bodies of each API's shapes
(tests/test_tracing.py checks them end to end through a sidecar and an OTLP receiver)."""

from __future__ import annotations

import json

from durable_sidecar.matching import genai

JSON = [(b"Content-Type", b"application/json")]
SSE = [(b"Content-Type", b"text/event-stream")]


def sse(*events: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def test_anthropic_messages_streamed_with_a_tool_use() -> None:
    request = {"model": "claude-sonnet-4", "max_tokens": 1024, "messages": [{"role": "user", "content": "hi"}]}
    body = sse(
        {"type": "message_start", "message": {"id": "msg_1", "model": "claude-sonnet-4-20260101",
                                              "usage": {"input_tokens": 25, "output_tokens": 1,
                                                        "cache_read_input_tokens": 7}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "toolu_1",
                                                                      "name": "get_weather", "input": {}}},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 40}},
    )
    name, attrs = genai.attributes("POST", "api.anthropic.com", "/v1/messages", json.dumps(request).encode(), body, SSE)
    assert name == "chat claude-sonnet-4"
    assert attrs == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic", "gen_ai.request.model": "claude-sonnet-4",
        "gen_ai.request.max_tokens": 1024, "gen_ai.response.id": "msg_1",
        "gen_ai.response.model": "claude-sonnet-4-20260101", "gen_ai.usage.input_tokens": 25,
        "gen_ai.usage.output_tokens": 40, "gen_ai.usage.cache_read.input_tokens": 7,
        "gen_ai.response.finish_reasons": ["tool_use"], "durable.gen_ai.tool_calls": ["get_weather"],
        "gen_ai.tool.name": "get_weather", "gen_ai.tool.call.id": "toolu_1",
    }


def test_chat_completions_with_two_tool_calls_and_cached_and_reasoning_tokens() -> None:
    request = {"model": "o4-mini", "max_completion_tokens": 500, "seed": 7, "messages": []}
    answer = {
        "id": "chatcmpl-9", "model": "o4-mini-2026", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "tool_calls": [{"id": "c1", "function": {"name": "search"}}, {"id": "c2", "function": {"name": "book"}}]}}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 30, "prompt_tokens_details": {"cached_tokens": 64},
                  "completion_tokens_details": {"reasoning_tokens": 12}},
    }
    name, attrs = genai.attributes("POST", "api.openai.com", "/v1/chat/completions", json.dumps(request).encode(),
                                   json.dumps(answer).encode(), JSON)
    assert name == "chat o4-mini" and attrs["gen_ai.request.max_tokens"] == 500 and attrs["gen_ai.request.seed"] == 7
    assert attrs["gen_ai.usage.cache_read.input_tokens"] == 64 and attrs["gen_ai.usage.reasoning.output_tokens"] == 12
    assert attrs["durable.gen_ai.tool_calls"] == ["search", "book"] and "gen_ai.tool.name" not in attrs


def test_the_responses_api_over_http_with_a_function_call() -> None:
    request = {"model": "gpt-5", "input": "weather?", "max_output_tokens": 300, "temperature": 0}
    answer = {"id": "resp_3", "model": "gpt-5-2026", "status": "completed",
              "output": [{"type": "function_call", "name": "get_weather", "call_id": "call_7", "arguments": "{}"}],
              "usage": {"input_tokens": 20, "output_tokens": 9, "input_tokens_details": {"cached_tokens": 0}}}
    name, attrs = genai.attributes("POST", "api.openai.com", "/v1/responses", json.dumps(request).encode(),
                                   json.dumps(answer).encode(), JSON)
    assert name == "chat gpt-5" and attrs["gen_ai.request.temperature"] == 0
    assert (attrs["gen_ai.tool.name"], attrs["gen_ai.tool.call.id"]) == ("get_weather", "call_7")
    assert attrs["gen_ai.usage.input_tokens"] == 20 and attrs["gen_ai.response.id"] == "resp_3"


def test_an_mcp_tool_call_is_execute_tool_and_its_result_names_no_tool() -> None:
    call = {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "charge", "arguments": {}}}
    answer = sse({"jsonrpc": "2.0", "id": 4, "result": {"content": [{"type": "tool_use", "name": "other"}]}})
    name, attrs = genai.attributes("POST", "tools.local", "/mcp", json.dumps(call).encode(), answer, SSE)
    assert name == "execute_tool charge"
    assert attrs == {"gen_ai.operation.name": "execute_tool", "gen_ai.provider.name": "mcp",
                     "mcp.method.name": "tools/call", "gen_ai.tool.name": "charge", "jsonrpc.request.id": "4"}


def test_other_steps_have_none_and_odd_shapes_do_not_raise() -> None:
    assert genai.attributes("GET", "api.openai.com", "/v1/models", b"", b"{}", JSON) is None
    assert genai.attributes("POST", "pay.example", "/v1/payments", b'{"amount": 5}', b"{}", JSON) is None
    odd = [{"choices": "x", "delta": "text", "output": "y", "content": 3, "usage": []}, [1], "s", None]
    request = json.dumps({"model": "m"}).encode()
    name, attrs = genai.attributes("POST", "h", "/v1/chat/completions", request,
                                   b"".join(b"data: " + json.dumps(o).encode() + b"\n\n" for o in odd), SSE)
    assert name == "chat m" and attrs["gen_ai.request.model"] == "m"


def test_contents_only_when_asked_in_the_conventions_parts() -> None:
    request = {"model": "gpt-4o", "messages": [{"role": "system", "content": "be brief"},
                                               {"role": "user", "content": [{"type": "text", "text": "plan"}]}]}
    answer = sse({"choices": [{"delta": {"content": "Day 1"}}]}, {"choices": [{"delta": {"content": ": Paris"}}]})
    body = json.dumps(request).encode()
    _, plain = genai.attributes("POST", "h", "/v1/chat/completions", body, answer, SSE)
    assert not any(k in plain for k in ("gen_ai.input.messages", "gen_ai.output.messages"))
    _, attrs = genai.attributes("POST", "h", "/v1/chat/completions", body, answer, SSE, contents=True)
    assert json.loads(attrs["gen_ai.input.messages"]) == [{"role": "user", "parts": [{"type": "text", "content": "plan"}]}]
    assert json.loads(attrs["gen_ai.system_instructions"]) == [{"type": "text", "content": "be brief"}]
    assert json.loads(attrs["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": "Day 1: Paris"}]}]


def test_anthropic_and_responses_contents() -> None:
    request = {"model": "claude", "max_tokens": 10, "system": "terse", "messages": [{"role": "user", "content": "hi"}]}
    stream = sse({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hel"}},
                 {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "lo"}})
    _, attrs = genai.attributes("POST", "api.anthropic.com", "/v1/messages", json.dumps(request).encode(), stream,
                                SSE, contents=True)
    assert json.loads(attrs["gen_ai.output.messages"])[0]["parts"][0]["content"] == "Hello"
    assert json.loads(attrs["gen_ai.system_instructions"]) == [{"type": "text", "content": "terse"}]
    responses = {"model": "gpt-5", "input": "weather?", "instructions": "be kind"}
    answer = {"object": "response", "output": [{"type": "message", "content": [{"type": "output_text", "text": "Sunny"}]}]}
    _, attrs = genai.attributes("POST", "h", "/v1/responses", json.dumps(responses).encode(),
                                json.dumps(answer).encode(), JSON, contents=True)
    assert json.loads(attrs["gen_ai.input.messages"]) == [{"role": "user", "parts": [{"type": "text", "content": "weather?"}]}]
    assert "Sunny" in attrs["gen_ai.output.messages"] and "be kind" in attrs["gen_ai.system_instructions"]
