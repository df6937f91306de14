"""The anthropic SDK's tool-use loop (messages.create), with one paid tool."""

from __future__ import annotations

import anthropic

import common

TOOLS = [{"name": "charge", "description": "Charge the customer.",
          "input_schema": {"type": "object", "properties": {"amount": {"type": "integer"}}, "required": ["amount"]}}]


def main() -> None:
    client = anthropic.Anthropic(base_url=common.FAKE_LLM, api_key="sk-ant-test", max_retries=0)
    messages: list[dict] = [{"role": "user", "content": "Please bill the customer."}]
    while True:
        reply = client.messages.create(model="m", max_tokens=256, tools=TOOLS, messages=messages)
        if reply.stop_reason != "tool_use":
            common.final("".join(block.text for block in reply.content if block.type == "text"))
            return
        messages.append({"role": "assistant", "content": [block.model_dump() for block in reply.content]})
        results = [{"type": "tool_result", "tool_use_id": block.id, "content": common.charge(**block.input)}
                   for block in reply.content if block.type == "tool_use"]
        messages.append({"role": "user", "content": results})


if __name__ == "__main__":
    main()
