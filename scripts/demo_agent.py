#!/usr/bin/env python3
"""A small agent with no idea it runs behind durable-sidecar: plain openai SDK, requests and httpx.

Each step asks the "LLM" (openai SDK; every other step streams), calls a search tool (requests) and
pays for the result (httpx). Prompts chain on earlier answers, like a real agent's. It reaches the
proxy only through HTTPS_PROXY / HTTP_PROXY and trusts its CA only through SSL_CERT_FILE /
REQUESTS_CA_BUNDLE. `--crash-after N` makes it SIGKILL itself after its N-th call.

Usage: python scripts/demo_agent.py --api https://127.0.0.1:PORT [--steps 4] [--crash-after 6] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import uuid

import httpx
import openai
import requests


class Agent:
    def __init__(self, api: str, crash_after: int | None, as_json: bool, random_keys: bool = False) -> None:
        self.api = api.rstrip("/")
        self.random_keys = random_keys
        self.crash_after = crash_after
        self.as_json = as_json
        self.calls = 0
        self.llm = openai.OpenAI(base_url=f"{self.api}/v1", api_key="sk-demo-not-a-real-key", max_retries=0)
        self.http = requests.Session()
        self.pay_client = httpx.Client(timeout=30)

    def report(self, step: int, call: str, outcome: str | None, seq: str | None, result: str) -> None:
        self.calls += 1
        if self.as_json:
            print(json.dumps({"step": step, "call": call, "outcome": outcome, "seq": seq, "result": result}), flush=True)
        else:
            print(f"  step {step} {call:<9} journal step {seq or '-':>3}  {outcome or 'no sidecar':<9}  {result}", flush=True)
        if self.crash_after is not None and self.calls >= self.crash_after:
            if not self.as_json:
                print(f"  !! agent crashes (SIGKILL) after {self.calls} calls", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    def think(self, step: int, prompt: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        if step % 2 == 0:
            stream = self.llm.chat.completions.create(model="demo-llm", messages=messages, stream=True)
            text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
            headers = stream.response.headers
        else:
            raw = self.llm.chat.completions.with_raw_response.create(model="demo-llm", messages=messages)
            text = raw.parse().choices[0].message.content or ""
            headers = raw.headers
        self.report(step, "llm" + (" (sse)" if step % 2 == 0 else ""), headers.get("durable-outcome"),
                    headers.get("durable-step"), text)
        return text

    def search(self, step: int, query: str) -> str:
        r = self.http.get(f"{self.api}/v1/search", params={"q": query}, headers={"Accept-Encoding": "gzip"})
        r.raise_for_status()
        top = r.json()["results"][0]
        self.report(step, "search", r.headers.get("durable-outcome"), r.headers.get("durable-step"), top)
        return top

    def pay(self, step: int, amount: int) -> str:
        # Like many SDKs, --random-keys mints a fresh Idempotency-Key per call (useless across restarts).
        headers = {"Idempotency-Key": f"sdk-{uuid.uuid4()}"} if self.random_keys else {}
        r = self.pay_client.post(f"{self.api}/v1/payments", json={"amount": amount, "memo": f"step {step}"}, headers=headers)
        r.raise_for_status()
        payment = r.json()["payment_id"]
        self.report(step, "payment", r.headers.get("durable-outcome"), r.headers.get("durable-step"),
                    f"{payment} ({amount} credits)")
        return payment

    def run(self, steps: int) -> None:
        answer, hit = "start", "nothing yet"
        for step in range(1, steps + 1):
            answer = self.think(step, f"step {step}: plan the next move after {answer!r}, knowing {hit!r}")
            hit = self.search(step, f"step {step} {answer[:20]}")
            self.pay(step, 10 * step)
        if not self.as_json:
            print(f"  agent finished all {steps} steps", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api", required=True, help="base URL of the paid API")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--crash-after", type=int, help="SIGKILL itself after this many calls")
    parser.add_argument("--json", action="store_true", help="one JSON line per call")
    parser.add_argument("--random-keys", action="store_true", help="send a fresh Idempotency-Key on every payment")
    args = parser.parse_args()
    try:
        Agent(args.api, args.crash_after, args.json, args.random_keys).run(args.steps)
    except Exception as e:  # show the agent's failure plainly, like a real agent's crash log
        print(f"agent failed: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
