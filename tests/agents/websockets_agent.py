"""A plain `websockets` client speaking the Responses API over WebSocket, with one paid tool.

The asyncio client, not websockets.sync: on Python 3.12.1 the sync client loses its opening
request on about 1 in 150 fresh TLS connections with nothing in between (docs/development.md)."""

from __future__ import annotations

import asyncio
import json

from websockets.asyncio.client import ClientConnection, connect

import common


async def turn(ws: ClientConnection, items: list[dict]) -> dict:
    await ws.send(json.dumps({"type": "response.create", "model": "m", "input": items}))
    while (event := json.loads(await asyncio.wait_for(ws.recv(), 30)))["type"] != "response.completed":
        pass
    return event["response"]["output"][0]


async def main() -> None:
    url = common.FAKE_LLM.replace("https://", "wss://").replace("http://", "ws://") + "/v1/responses"
    async with connect(url, open_timeout=30) as ws:  # HTTPS_PROXY and SSL_CERT_FILE from the environment
        items: list[dict] = [{"role": "user", "content": "Please bill the customer."}]
        call = await turn(ws, items)
        result = common.charge(**json.loads(call["arguments"]))
        items += [call, {"type": "function_call_output", "call_id": call["call_id"], "output": result}]
        common.final((await turn(ws, items))["content"][0]["text"])


if __name__ == "__main__":
    asyncio.run(main())
