"""An agent framework (langchain-openai) as a client: tool calls and structured output over the edge, from
scripted fake-engine output."""

from __future__ import annotations

from typing import Any

from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from .conftest import Edge

MODEL = "test/tiny-chat"


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"Sunny in {city}"


class City(BaseModel):
    name: str
    population: int


async def test_langchain_tool_calls(make_edge: Any) -> None:
    markup = ["<tool_call>\n", '{"name": "get_weather", "arguments": {"city": "Oslo"}}', "\n</tool_call>"]
    edge: Edge = await make_edge(options={"tokens": markup})
    llm = ChatOpenAI(model=MODEL, base_url=edge.base_url, api_key="x", max_retries=0)  # type: ignore[arg-type]
    reply = await llm.bind_tools([get_weather]).ainvoke("What is the weather in Oslo?")
    assert [(c["name"], c["args"]) for c in reply.tool_calls] == [("get_weather", {"city": "Oslo"})]
    sent = edge.cortex.slots[MODEL].loaded.requests[-1]
    assert [t.name for t in sent.tools] == ["get_weather"]
    assert sent.tools[0].parameters is not None and "city" in sent.tools[0].parameters["properties"]


async def test_langchain_structured_output(make_edge: Any) -> None:
    edge: Edge = await make_edge(options={"tokens": ['{"name": "Oslo", ', '"population": 709000}']})
    llm = ChatOpenAI(model=MODEL, base_url=edge.base_url, api_key="x", max_retries=0)  # type: ignore[arg-type]
    city = await llm.with_structured_output(City, method="json_schema").ainvoke("A city?")
    assert city == City(name="Oslo", population=709000)
    sent = edge.cortex.slots[MODEL].loaded.requests[-1]
    assert sent.response_format is not None and sent.response_format.type == "json_schema"
