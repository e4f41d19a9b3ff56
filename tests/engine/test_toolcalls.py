"""Tool-call parsing per model family (pure): whole outputs, and the same outputs fed in arbitrary pieces."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from helexa.engine.toolcalls import Call, Text, ToolCallParser, family_of, generic_tool_turns, parse_all
from tests.helpers.strategies import SHARED_MACHINE

HERMES = (
    'Let me look that up.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
)
MISTRAL = (
    '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
    '{"name": "get_time", "arguments": {}}]'
)
LLAMA3 = '{"name": "get_weather", "parameters": {"city": "Oslo"}}'
PYTHON_TAG = (
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
    '{"name": "get_time", "parameters": {}}'
)
OUTPUTS = {
    "hermes": ("Let me look that up.", ["get_weather", "get_time"]),
    "mistral": ("", ["get_weather", "get_time"]),
    "llama3": ("", ["get_weather"]),
    "python_tag": ("", ["get_weather", "get_time"]),
}
TEXTS = {"hermes": HERMES, "mistral": MISTRAL, "llama3": LLAMA3, "python_tag": PYTHON_TAG}


@pytest.mark.parametrize("family", list(OUTPUTS))
def test_each_family_parses(family: str) -> None:
    text, calls = parse_all(TEXTS[family])
    expected_text, names = OUTPUTS[family]
    assert text == expected_text
    assert [c.name for c in calls] == names
    assert json.loads(calls[0].arguments) == {"city": "Oslo"}


def test_text_that_is_not_a_call_stays_text() -> None:
    for text in ('{"answer": 42}', "a < b and [x] > y", "<tool_call>not json</tool_call>", "plain"):
        out, calls = parse_all(text)
        assert calls == [] and out == text


def test_families_from_templates() -> None:
    assert family_of("{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert family_of("{% for tool in tools %}[TOOL_CALLS]{% endfor %}") == "mistral"
    assert family_of('{% if tools %}{"name": ..., "parameters": ...}{% endif %}') == "llama3"
    assert family_of("{% if tools %}{{ tools | tojson }}{% endif %}") == "json"
    assert family_of("{{ messages }}") is None and family_of(None) is None


@SHARED_MACHINE
@given(st.sampled_from(list(TEXTS)), st.lists(st.integers(1, 40), min_size=1, max_size=30))
def test_streamed_in_any_pieces_equals_whole(family: str, cuts: list[int]) -> None:
    text = TEXTS[family]
    parser = ToolCallParser()
    pieces = []
    i = 0
    for n in cuts:
        pieces += parser.feed(text[i : i + n])
        i += n
    pieces += parser.feed(text[i:]) + parser.finish()
    streamed_text = "".join(p.text for p in pieces if isinstance(p, Text))
    streamed_calls = [p for p in pieces if isinstance(p, Call)]
    whole_text, whole_calls = parse_all(text)
    assert (streamed_text, streamed_calls) == (whole_text, whole_calls)
    assert "<tool_call>" not in streamed_text and "[TOOL_CALLS]" not in streamed_text


def test_generic_tool_turns_teach_hermes_markup_to_a_template_without_tools() -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    turns: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
                }
            ],
        },
        {"role": "tool", "content": "Sunny", "tool_call_id": "c1"},
    ]
    out = generic_tool_turns(turns, tools)
    assert [t["role"] for t in out] == ["system", "user", "assistant", "user"]
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in out[0]["content"]
    # What the model is shown it said reads back as the call it made.
    assert parse_all(out[2]["content"]) == ("", [Call(name="get_weather", arguments='{"city":"Oslo"}')])
    assert out[3]["content"] == "<tool_response>\nSunny\n</tool_response>"
    assert turns[1]["content"] is None  # the caller's turns are left as they were
    # A system turn of the client's keeps its words first; the tools join it.
    own = generic_tool_turns([{"role": "system", "content": "Be brief."}, *turns[:1]], tools)
    assert [t["role"] for t in own] == ["system", "user"]
    assert own[0]["content"].startswith("Be brief.\n\nYou may call functions")
