"""A plain `websockets` client speaking the Responses API over WebSocket, with one paid tool."""

from __future__ import annotations

import json

from websockets.sync.client import connect

import common


def turn(ws, items: list[dict]) -> dict:
    ws.send(json.dumps({"type": "response.create", "model": "m", "input": items}))
    while (event := json.loads(ws.recv(timeout=30)))["type"] != "response.completed":
        pass
    return event["response"]["output"][0]


def main() -> None:
    url = common.FAKE_LLM.replace("https://", "wss://").replace("http://", "ws://") + "/v1/responses"
    with connect(url, open_timeout=30) as ws:  # HTTPS_PROXY and SSL_CERT_FILE from the environment
        items: list[dict] = [{"role": "user", "content": "Please bill the customer."}]
        call = turn(ws, items)
        result = common.charge(**json.loads(call["arguments"]))
        items += [call, {"type": "function_call_output", "call_id": call["call_id"], "output": result}]
        common.final(turn(ws, items)["content"][0]["text"])


if __name__ == "__main__":
    main()
