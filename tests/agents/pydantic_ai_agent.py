"""pydantic-ai's Agent with OpenAIChatModel and one paid tool."""

from __future__ import annotations

from pydantic_ai import Agent
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

import common


def main() -> None:
    model = OpenAIChatModel("m", provider=OpenAIProvider(base_url=f"{common.FAKE_LLM}/v1", api_key="sk-test"))
    agent = Agent(model, instructions="Bill the customer with the charge tool.")

    @agent.tool_plain
    def charge(amount: int) -> str:
        """Charge the customer."""
        return common.charge(amount)

    common.final(agent.run_sync("Please bill the customer.").output)


if __name__ == "__main__":
    main()
