"""litellm's completion() with tools, an OpenAI-compatible model at the fake LLM. Its import-time
fetch of the model cost map would pass through the sidecar unjournaled (the built-in list), and with
no internet here it retries for seconds: litellm's own switch turns it off."""

from __future__ import annotations

import json
import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
import litellm  # noqa: E402

import common  # noqa: E402

TOOLS = [{"type": "function", "function": {"name": "charge", "description": "Charge the customer.", "parameters": {
    "type": "object", "properties": {"amount": {"type": "integer"}}, "required": ["amount"]}}}]


def main() -> None:
    messages: list[dict] = [{"role": "user", "content": "Please bill the customer."}]
    while True:
        reply = litellm.completion(model="openai/m", api_base=f"{common.FAKE_LLM}/v1", api_key="sk-test",
                                   messages=messages, tools=TOOLS, num_retries=0)
        message = reply.choices[0].message
        if not message.tool_calls:
            common.final(message.content)
            return
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls:
            result = common.charge(**json.loads(call.function.arguments))
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})


if __name__ == "__main__":
    main()
