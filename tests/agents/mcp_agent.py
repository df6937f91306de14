"""An mcp SDK client (`mcp.Client` over Streamable HTTP) making two paid tool calls: with `legacy`,
the classic initialize handshake and a session id on every request; with `auto`, the 2026-07 protocol."""

from __future__ import annotations

import asyncio
import sys

from mcp import Client

import common


def text(result) -> str:
    return "".join(getattr(block, "text", "") for block in result.content)


async def main(url: str, mode: str) -> None:
    async with Client(url, mode=mode) as client:
        first = text(await client.call_tool("charge", {"amount": 3}))
        print(f"tool: {first}", flush=True)
        common.crash_point()
        second = text(await client.call_tool("charge", {"amount": 4}))
        common.final(f"{first}; {second}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
