"""LangGraph's ReAct agent with langchain-openai's ChatOpenAI and one paid tool."""

from __future__ import annotations

from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.prebuilt import create_react_agent

import common


@tool
def charge(amount: int) -> str:
    """Charge the customer `amount` dollars."""
    return common.charge(amount)


def main() -> None:
    model = ChatOpenAI(model="m", base_url=f"{common.FAKE_LLM}/v1", api_key="sk-test", max_retries=0)
    graph = create_react_agent(model, [charge])
    state = graph.invoke({"messages": [("user", "Please bill the customer.")]})
    common.final(str(state["messages"][-1].content))


if __name__ == "__main__":
    main()
