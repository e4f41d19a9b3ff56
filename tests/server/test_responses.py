"""`POST /v1/responses` with the openai SDK (strict) as the client, over the scripted fake engine: text
streamed and not (the typed events in order, numbered, reassembling to the text; the SDK's
`responses.stream` helper), `instructions`, `max_output_tokens` → incomplete, function tools → function
call items, a `function_call_output` turn, `text.format` passed to the engine, and the stateless refusals."""

from __future__ import annotations

import json
from typing import Any

import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.responses import FunctionToolParam, ResponseInputParam, ResponseTextConfigParam

from helexa.engine.base import GenerationRequest
from helexa.mesh.errors import InvalidRequest
from helexa.mesh.server.responses_routes import add_responses_routes
from helexa.mesh.server.responses_wire import parse_responses_request

from .conftest import DEFAULT_TOKENS, Edge

MODEL = "test/tiny-chat"
HELLO = "".join(DEFAULT_TOKENS)
TOOLS: list[FunctionToolParam] = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        "strict": True,
    }
]
MARKUP = [
    "Checking.",
    "<tool_call>\n",
    '{"name": "get_weather", "arguments": {"city": "Oslo"}}',
    "\n</tool_call>",
]


async def _edge(make_edge: Any, tokens: list[str] | None = None) -> Edge:
    options = {"tokens": tokens} if tokens is not None else None
    edge: Edge = await make_edge(configure=add_responses_routes, options=options)
    return edge


def _last_request(edge: Edge) -> GenerationRequest:
    return edge.cortex.slots[MODEL].loaded.requests[-1]


async def test_text_not_streamed(make_edge: Any) -> None:
    edge = await _edge(make_edge)
    reply = await edge.client.responses.create(model=MODEL, input="Say hello", instructions="Be brief.")
    assert reply.status == "completed" and reply.object == "response"
    assert reply.output_text == HELLO
    assert reply.output[0].type == "message" and reply.output[0].role == "assistant"
    assert reply.instructions == "Be brief."
    assert reply.usage is not None and reply.usage.output_tokens > 0
    assert reply.usage.total_tokens == reply.usage.input_tokens + reply.usage.output_tokens
    messages = _last_request(edge).messages or ()
    assert [(m.role, m.content) for m in messages] == [("system", "Be brief."), ("user", "Say hello")]


async def test_text_streamed_in_order(make_edge: Any) -> None:
    edge = await _edge(make_edge)
    stream = await edge.client.responses.create(model=MODEL, input="Say hello", stream=True)
    events = [event async for event in stream]
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == HELLO
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.output_text == text and completed.response.usage is not None


async def test_stream_helper(make_edge: Any) -> None:
    edge = await _edge(make_edge)
    async with edge.client.responses.stream(model=MODEL, input="Say hello") as stream:
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(deltas) == final.output_text == HELLO


async def test_max_output_tokens_is_incomplete(make_edge: Any) -> None:
    edge = await _edge(make_edge)
    reply = await edge.client.responses.create(model=MODEL, input="Say hello", max_output_tokens=2)
    assert reply.status == "incomplete"
    assert reply.incomplete_details is not None and reply.incomplete_details.reason == "max_output_tokens"
    assert _last_request(edge).sampling.max_tokens == 2
    stream = await edge.client.responses.create(
        model=MODEL, input="Say hello", max_output_tokens=2, stream=True
    )
    last = [e async for e in stream][-1]
    assert last.type == "response.incomplete"


async def test_function_calls(make_edge: Any) -> None:
    edge = await _edge(make_edge, MARKUP)
    reply = await edge.client.responses.create(model=MODEL, input="Weather in Oslo?", tools=TOOLS)
    assert [o.type for o in reply.output] == ["message", "function_call"]
    assert reply.output_text == "Checking."
    call = reply.output[1]
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    assert json.loads(call.arguments) == {"city": "Oslo"}
    sent = _last_request(edge)
    assert [t.name for t in sent.tools] == ["get_weather"] and sent.tool_choice == "auto"

    stream = await edge.client.responses.create(
        model=MODEL, input="Weather in Oslo?", tools=TOOLS, stream=True
    )
    events = [e async for e in stream]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "Checking."
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and json.loads(done[0].arguments) == {"city": "Oslo"}
    completed = events[-1]
    assert completed.type == "response.completed"
    assert [o.type for o in completed.response.output] == ["message", "function_call"]


async def test_function_call_output_in_the_input(make_edge: Any) -> None:
    edge = await _edge(make_edge)
    history: ResponseInputParam = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": '{"city": "Oslo"}',
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 21 C"},
    ]
    reply = await edge.client.responses.create(model=MODEL, input=history, tools=TOOLS)
    assert reply.status == "completed"
    messages = _last_request(edge).messages or ()
    assert [m.role for m in messages] == ["user", "assistant", "tool"]
    assert messages[1].tool_calls[0].name == "get_weather" and messages[1].tool_calls[0].id == "call_1"
    assert messages[2].tool_call_id == "call_1" and messages[2].content == "Sunny, 21 C"


async def test_text_format_json_schema_reaches_the_engine(make_edge: Any) -> None:
    edge = await _edge(make_edge, ['{"city": ', '"Oslo"}'])
    schema: dict[str, object] = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    }
    text: ResponseTextConfigParam = {
        "format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}
    }
    reply = await edge.client.responses.create(model=MODEL, input="A city?", text=text)
    assert json.loads(reply.output_text) == {"city": "Oslo"}
    fmt = _last_request(edge).response_format
    assert fmt is not None and fmt.type == "json_schema" and fmt.schema == schema
    await edge.client.responses.create(model=MODEL, input="A city?", text={"format": {"type": "json_object"}})
    fmt = _last_request(edge).response_format
    assert fmt is not None and fmt.type == "json_object"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0].type",
        ),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
    ],
)
async def test_refusals_name_the_field(make_edge: Any, extra: dict[str, Any], param: str) -> None:
    edge = await _edge(make_edge)
    body: dict[str, Any] = {"model": MODEL, "input": "hi", **extra}
    with pytest.raises(openai.BadRequestError) as info:
        await edge.client.post("/responses", body=body, cast_to=object)
    assert info.value.status_code == 400
    assert isinstance(info.value.body, dict) and info.value.body.get("param") == param


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_field = st.sampled_from(
    ["input", "instructions", "tools", "tool_choice", "text", "max_output_tokens", "temperature", "metadata"]
)


@settings(max_examples=300, deadline=None)
@given(fields=st.dictionaries(_field, _json, max_size=4), input=_json)
def test_parser_refuses_with_400_only(fields: dict[str, Any], input: Any) -> None:
    body = orjson.dumps({"model": MODEL, "input": input, **fields})
    try:
        parse_responses_request(body)
    except InvalidRequest as exc:
        assert exc.status == 400 and exc.param
