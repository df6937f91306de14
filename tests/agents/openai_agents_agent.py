"""openai-agents with one paid function tool, over Chat Completions (`chat`), the Responses API
over HTTP (`responses`) or over WebSocket (`websocket`)."""

from __future__ import annotations

import asyncio
import sys

from agents import Agent, OpenAIChatCompletionsModel, Runner, function_tool, set_default_openai_client
from agents import set_default_openai_responses_transport, set_tracing_disabled
from openai import AsyncOpenAI

import common


@function_tool
def charge(amount: int) -> str:
    """Charge the customer `amount` dollars."""
    return common.charge(amount)


async def main(api: str) -> None:
    set_tracing_disabled(True)  # its exporter would post to api.openai.com, unreachable here
    client = AsyncOpenAI(base_url=f"{common.FAKE_LLM}/v1", api_key="sk-test", max_retries=0)
    model: OpenAIChatCompletionsModel | str = "m"  # a name: the default provider builds it (Responses API)
    if api == "chat":
        model = OpenAIChatCompletionsModel(model="m", openai_client=client)
    else:
        set_default_openai_client(client, use_for_tracing=False)
        if api == "websocket":  # as its docs say: one WebSocket for every turn of the run
            set_default_openai_responses_transport("websocket")
    agent = Agent(name="biller", instructions="Charge 3 dollars, then say done.", tools=[charge], model=model)
    result = await Runner.run(agent, "Please bill the customer.")
    common.final(str(result.final_output))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
