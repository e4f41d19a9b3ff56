"""The OpenAI Agents SDK (`openai-agents`), whose default model speaks `/v1/responses`, as a client: a
plain run, and a run whose agent calls a function tool (the fake engine's scripted markup)."""

from __future__ import annotations

from typing import Any

import pytest
from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

from helexa.mesh.server.responses_routes import add_responses_routes

from .conftest import DEFAULT_TOKENS, Edge

MODEL = "test/tiny-chat"
MARKUP = ["<tool_call>\n", '{"name": "get_weather", "arguments": {"city": "Oslo"}}', "\n</tool_call>"]


@pytest.fixture(autouse=True)
def _no_tracing() -> None:
    set_tracing_disabled(True)  # the SDK would export traces to OpenAI


def _model(edge: Edge) -> Any:
    return OpenAIResponsesModel(model=MODEL, openai_client=edge.client)


async def test_agent_run(make_edge: Any) -> None:
    edge: Edge = await make_edge(configure=add_responses_routes)
    agent = Agent(name="helper", instructions="Be brief.", model=_model(edge))
    result = await Runner.run(agent, "Say hello")
    assert result.final_output == "".join(DEFAULT_TOKENS)


async def test_agent_calls_a_tool(make_edge: Any) -> None:
    edge: Edge = await make_edge(configure=add_responses_routes, options={"tokens": MARKUP})
    seen: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        seen.append(city)
        return f"Sunny in {city}"

    agent = Agent(
        name="weather",
        model=_model(edge),
        tools=[get_weather],
        tool_use_behavior="stop_on_first_tool",
    )
    result = await Runner.run(agent, "Weather in Oslo?")
    assert seen == ["Oslo"] and result.final_output == "Sunny in Oslo"
