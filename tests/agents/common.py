"""What every compatibility agent shares: its paid tool, and the crash after it.

The agents are configured only by the environment `durable run` gives them (proxy variables, CA
bundle) plus FAKE_LLM (the fake model's base URL), PAID_API (the paid API's) and CRASH=1 (die by
SIGKILL right after the paid tool call, the costliest moment to crash)."""

from __future__ import annotations

import os
import signal

import requests

FAKE_LLM = os.environ.get("FAKE_LLM", "")
PAID_API = os.environ.get("PAID_API", "")


def charge(amount: int) -> str:
    """The paid tool: a payment through the proxy (requests honours HTTPS_PROXY and REQUESTS_CA_BUNDLE)."""
    answer = requests.post(f"{PAID_API}/v1/payments", json={"amount": amount}, timeout=30)
    answer.raise_for_status()
    result = answer.text.strip()
    print(f"tool: {result}", flush=True)
    crash_point()
    return result


def crash_point() -> None:
    """With CRASH=1, die here by SIGKILL: right after a paid tool call."""
    if os.environ.get("CRASH") == "1":
        os.kill(os.getpid(), signal.SIGKILL)


def final(text: str) -> None:
    print(f"final: {text}", flush=True)
