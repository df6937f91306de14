"""The agent tests/test_durable_test.py records and replays: a chat completion and a streamed one
(the openai SDK), a search (requests, its key in a header and the query), a Responses API turn over
a WebSocket, and an MCP tool call (the mcp SDK). VARIANT changes it as a code change would: `extra`
makes one more call, `fewer` one call fewer (no tool call), `different` changes one request's body.

Run: python fixture_agent.py API_URL WS_URL MCP_URL   (OPENAI_API_KEY is the planted secret)"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import requests
from mcp import Client
from openai import OpenAI
from websockets.asyncio.client import connect

API, WS, MCP = sys.argv[1:4]
VARIANT = os.environ.get("VARIANT", "")
KEY = os.environ["OPENAI_API_KEY"]


async def converse() -> str:
    async with connect(WS, open_timeout=20) as ws:  # the proxy from the environment
        await ws.send(json.dumps({"type": "response.create", "model": "gpt-4o", "input": "weather?"}))
        while (event := json.loads(await ws.recv()))["type"] != "response.completed":
            pass
        return event["type"]


async def charge() -> str:
    async with Client(MCP, mode="auto") as client:
        result = await client.call_tool("charge", {"amount": 7})
        return "".join(getattr(block, "text", "") for block in result.content)


def main() -> None:
    llm = OpenAI(base_url=f"{API}/v1", api_key=KEY, max_retries=0)
    prompt = "plan a holiday" if VARIANT == "different" else "plan a trip"
    chat = llm.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": prompt}])
    print("chat:", chat.choices[0].message.content, flush=True)
    stream = llm.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "and the budget?"}], stream=True
    )
    print("stream:", "".join(c.choices[0].delta.content or "" for c in stream if c.choices), flush=True)
    found = requests.get(f"{API}/v1/search", params={"q": "paris", "api_key": KEY}, headers={"X-Api-Key": KEY})
    found.raise_for_status()
    print("search:", found.status_code, flush=True)
    print("websocket:", asyncio.run(converse()), flush=True)
    if VARIANT != "fewer":
        print("tool:", asyncio.run(charge()), flush=True)
    if VARIANT == "extra":
        requests.get(f"{API}/v1/search", params={"q": "one more"}).raise_for_status()


if __name__ == "__main__":
    main()
