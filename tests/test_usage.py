"""Tokens an answer reports (what replaying it saves), for the two API shapes, plain and streamed."""

from __future__ import annotations

import gzip
import json

from durable_sidecar.matching import usage

JSON = [(b"Content-Type", b"application/json")]
SSE = [(b"Content-Type", b"text/event-stream")]


def sse(*events: dict) -> bytes:
    return b"".join(b"event: x\ndata: " + json.dumps(e).encode() + b"\n\n" for e in events)


ANTHROPIC_MESSAGE = {"type": "message", "content": [{"type": "text", "text": "hi"}],
                     "usage": {"input_tokens": 10, "output_tokens": 3}}
ANTHROPIC_STREAM = sse(
    {"type": "message_start", "message": {"type": "message", "usage": {"input_tokens": 10, "output_tokens": 1}}},
    {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "hi"}},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}},
    {"type": "message_stop"},
)


def test_anthropic_stream_counts_each_running_total_once() -> None:
    plain = usage.tokens(json.dumps(ANTHROPIC_MESSAGE).encode(), JSON)
    assert plain == 13
    assert usage.tokens(ANTHROPIC_STREAM, SSE) == plain  # not 14: message_start's 1 is part of the 3


def test_anthropic_stream_whose_delta_repeats_the_input_count() -> None:
    stream = sse(
        {"type": "message_start", "message": {"usage": {"input_tokens": 10, "output_tokens": 1}}},
        {"type": "message_delta", "usage": {"input_tokens": 10, "output_tokens": 3}},
    )
    assert usage.tokens(stream, SSE) == 13


def test_openai_completion_and_stream_with_usage() -> None:
    counts = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    assert usage.tokens(json.dumps({"choices": [], "usage": counts}).encode(), JSON) == 13
    stream = sse({"choices": [{"delta": {"content": "a"}}], "usage": None},
                 {"choices": [{"delta": {"content": "b"}}]},
                 {"choices": [], "usage": counts}) + b"data: [DONE]\n\n"
    assert usage.tokens(stream, SSE) == 13


def test_compressed_answers_and_answers_without_usage() -> None:
    body = gzip.compress(json.dumps(ANTHROPIC_MESSAGE).encode())
    assert usage.tokens(body, [*JSON, (b"Content-Encoding", b"gzip")]) == 13
    assert usage.tokens(b'{"id": 1}', JSON) == 0
    assert usage.tokens(b"not json", JSON) == 0
    assert usage.tokens(b"\xff\xfe", JSON) == 0


def test_a_streamed_responses_api_answer_counts_its_usage() -> None:
    """The Responses API streams its usage inside the `response.completed` event's response."""
    events = [
        {"type": "response.created", "response": {"id": "resp_1", "usage": None}},
        {"type": "response.output_text.delta", "delta": "Hel"},
        {"type": "response.completed",
         "response": {"id": "resp_1", "usage": {"input_tokens": 12, "output_tokens": 5, "total_tokens": 17}}},
    ]
    stream = b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)
    assert usage.tokens(stream, SSE) == 17
