"""Tool-call parsing per model family (pure): whole outputs, and the same outputs fed in arbitrary pieces."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from helexa.engine.toolcalls import Call, Text, ToolCallParser, family_of, parse_all
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
