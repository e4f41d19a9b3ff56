"""`POST /v1/responses` through an entry agent to the agent that serves the model (forwarded as raw
bytes to `/mesh/peer/v1/responses`): text and function calls, streamed and not, as they work locally."""

from __future__ import annotations

import json

import openai
from openai.types.responses import FunctionToolParam

from tests.helpers.agents import Fleet, entry

MARKUP = ["Sure.", "<tool_call>\n", '{"name": "get_time", "arguments": {"zone": "CET"}}', "\n</tool_call>"]
TOOLS: list[FunctionToolParam] = [
    {"type": "function", "name": "get_time", "parameters": {"type": "object"}, "strict": False}
]


async def test_responses_through_a_second_agent(fleet: Fleet) -> None:
    entries = [entry("org/tools", options={"tokens": MARKUP})]
    a, b = await fleet.serving_pair(entries, "org/tools")
    client = openai.AsyncOpenAI(base_url=f"{a.url}/v1", api_key="none", _strict_response_validation=True)
    async with client:
        reply = await client.responses.create(model="org/tools", input="time?", tools=TOOLS)
        assert reply.output_text == "Sure."
        call = reply.output[-1]
        assert call.type == "function_call" and call.name == "get_time"
        assert json.loads(call.arguments) == {"zone": "CET"}
        async with client.responses.stream(model="org/tools", input="time?", tools=TOOLS) as stream:
            deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
            final = await stream.get_final_response()
        assert "".join(deltas) == "Sure." and final.output[-1].type == "function_call"
        plain = await client.responses.create(model="org/tools", input="time?")  # no tools: text as is
        assert plain.output_text == "".join(MARKUP)
    assert a.engine.requests_total == 0 and b.engine.requests_total == 3  # served on b only
