"""Tool calls through the HTTP edge with the openai SDK (strict) over a scripted fake engine that emits
each family's markup: non-streamed `tool_calls` with finish_reason "tool_calls", streamed deltas that
reassemble to the same calls, markup never shown as content, and the tool-result turn accepted."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from .conftest import Edge

MODEL = "test/tiny-chat"
TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    },
]
ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Weather and time in Oslo?"}]
SCRIPTS = {
    "hermes": [
        "Checking.",
        "<tool",
        "_call>\n",
        '{"name": "get_weather", ',
        '"arguments": {"city": "Oslo"}}',
        "\n</tool_call>",
        "\n<tool_call>\n",
        '{"name": "get_time", "arguments": {}}',
        "\n</tool_call>",
    ],
    "mistral": [
        "[TOOL",
        "_CALLS]",
        '[{"name": "get_weather", "arguments": {"city": "Oslo"}}, ',
        '{"name": "get_time", "arguments": {}}]',
    ],
    "llama3": ['{"name": "get_weather", ', '"parameters": {"city": "Oslo"}}'],
}


@pytest.mark.parametrize("family", list(SCRIPTS))
async def test_tool_calls_streamed_and_not(make_edge: Any, family: str) -> None:
    edge: Edge = await make_edge(options={"tokens": SCRIPTS[family]})
    reply = await edge.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    names = [c.function.name for c in calls]  # type: ignore[union-attr]
    assert names[0] == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Oslo"}  # type: ignore[union-attr]
    assert all(c.id.startswith("call_") for c in calls)
    assert "tool_call" not in (choice.message.content or "") and "TOOL_CALLS" not in (
        choice.message.content or ""
    )

    stream = await edge.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, stream=True)
    content = ""
    streamed: dict[int, dict[str, str]] = {}
    finish = None
    async for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                slot = streamed.setdefault(tc.index, {"name": "", "arguments": ""})
                if tc.function is not None:
                    slot["name"] += tc.function.name or ""
                    slot["arguments"] += tc.function.arguments or ""
            finish = c.finish_reason or finish
    assert finish == "tool_calls"
    assert [streamed[i]["name"] for i in sorted(streamed)] == names
    assert [json.loads(streamed[i]["arguments"]) for i in sorted(streamed)] == [
        json.loads(c.function.arguments)  # type: ignore[union-attr]
        for c in calls
    ]
    assert content == (choice.message.content or "")


async def test_tool_choice_and_the_tool_result_turn_reach_the_engine(edge: Edge) -> None:
    model = edge.cortex.slots[MODEL].loaded
    conversation: list[ChatCompletionMessageParam] = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
    ]
    reply = await edge.client.chat.completions.create(
        model=MODEL,
        messages=conversation,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False,
    )
    assert reply.choices[0].finish_reason == "length" or reply.choices[0].message.content
    sent = model.requests[-1]
    assert [t.name for t in sent.tools] == ["get_weather", "get_time"]
    assert sent.tool_choice == "get_time" and sent.parallel_tool_calls is False
    assistant, tool = sent.messages[1], sent.messages[2]  # type: ignore[index]
    assert (
        assistant.tool_calls[0].name == "get_weather"
        and assistant.tool_calls[0].arguments == '{"city": "Oslo"}'
    )
    assert tool.role == "tool" and tool.tool_call_id == "call_1" and tool.content == "Sunny, 21 C"

    await edge.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none")
    assert model.requests[-1].tool_choice == "none"
