"""Plain aiohttp (trust_env=True: it honours HTTPS_PROXY and SSL_CERT_FILE) calling Chat Completions
with one paid tool, by hand: no SDK at all."""

from __future__ import annotations

import asyncio
import json

import aiohttp

import common

TOOLS = [{"type": "function", "function": {"name": "charge", "description": "Charge the customer.", "parameters": {
    "type": "object", "properties": {"amount": {"type": "integer"}}, "required": ["amount"]}}}]


async def main() -> None:
    messages: list[dict] = [{"role": "user", "content": "Please bill the customer."}]
    async with aiohttp.ClientSession(trust_env=True) as session:  # the default, False, bypasses the proxy
        while True:
            async with session.post(f"{common.FAKE_LLM}/v1/chat/completions",
                                    json={"model": "m", "messages": messages, "tools": TOOLS},
                                    headers={"Authorization": "Bearer sk-test"}) as answer:
                answer.raise_for_status()
                message = (await answer.json())["choices"][0]["message"]
            calls = message.get("tool_calls") or []
            if not calls:
                common.final(message["content"])
                return
            messages.append(message)
            for call in calls:
                result = common.charge(**json.loads(call["function"]["arguments"]))
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})


if __name__ == "__main__":
    asyncio.run(main())
