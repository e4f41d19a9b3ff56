"""Tools, structured-output fields, `n` and logprobs travel through an entry agent to the agent that
serves the model (forwarded as raw bytes) exactly as they work locally."""

from __future__ import annotations

import json

import openai
from openai.types.chat import ChatCompletionToolParam

from tests.helpers.agents import Fleet, entry

MARKUP = ["Sure.", "<tool_call>\n", '{"name": "get_time", "arguments": {"zone": "CET"}}', "\n</tool_call>"]
TOOLS: list[ChatCompletionToolParam] = [
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
]


async def test_tool_calls_and_choices_through_a_second_agent(fleet: Fleet) -> None:
    entries = [entry("org/tools", options={"tokens": MARKUP})]
    a, b = await fleet.serving_pair(entries, "org/tools")
    client = openai.AsyncOpenAI(base_url=f"{a.url}/v1", api_key="none", _strict_response_validation=True)
    async with client:
        reply = await client.chat.completions.create(
            model="org/tools",
            messages=[{"role": "user", "content": "time?"}],
            tools=TOOLS,
            n=2,
        )
        assert [c.index for c in reply.choices] == [0, 1]
        for choice in reply.choices:
            assert choice.finish_reason == "tool_calls" and choice.message.content == "Sure."
            call = (choice.message.tool_calls or [])[0]
            assert call.function.name == "get_time"  # type: ignore[union-attr]
            assert json.loads(call.function.arguments) == {"zone": "CET"}  # type: ignore[union-attr]
        stream = await client.chat.completions.create(
            model="org/tools",
            messages=[{"role": "user", "content": "time?"}],
            tools=TOOLS,
            stream=True,
        )
        names = [
            tc.function.name
            async for c in stream
            for ch in c.choices
            for tc in ch.delta.tool_calls or []
            if tc.function
        ]
        assert names == ["get_time"]
    assert a.engine.requests_total == 0 and b.engine.requests_total == 3  # served on b only
