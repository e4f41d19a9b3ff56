"""The Anthropic Messages API (`/v1/messages`) with the real `anthropic` SDK as the client: messages
streamed and not, system prompts, stop sequences, max_tokens, tools (`tool_use` blocks out of the scripted
fake engine's `<tool_call>` markup) and the `tool_result` turn, count_tokens, errors in Anthropic's
envelope (the SDK's exception classes), `x-api-key` with client keys, and `/v1/models` in its shape."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import anthropic
import pytest
from anthropic.types import MessageParam, ToolParam
from hypothesis import given, settings
from hypothesis import strategies as st

from helexa.mesh.errors import InvalidRequest
from helexa.mesh.server import anthropic_wire, appkeys

from .conftest import Edge

MODEL = "test/tiny-chat"
TEXT = "Hello, world! How are you?"  # the default script
ASK: list[MessageParam] = [{"role": "user", "content": "Say hello"}]
TOOLS: list[ToolParam] = [
    {
        "name": "get_weather",
        "description": "The weather in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
    {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
]
HERMES = [
    "Checking.",
    "<tool",
    "_call>\n",
    '{"name": "get_weather", ',
    '"arguments": {"city": "Oslo"}}',
    "\n</tool_call>",
    "\n<tool_call>\n",
    '{"name": "get_time", "arguments": {}}',
    "\n</tool_call>",
]

# The SDK's newest versions have no sampling arguments; older clients (and other tools) send them.
SAMPLING = {"temperature": 0.5, "top_p": 0.9, "top_k": 3}

MakeClient = Callable[..., Awaitable[tuple[Edge, anthropic.AsyncAnthropic]]]


@pytest.fixture
async def make_client(make_edge: Any) -> AsyncIterator[MakeClient]:
    clients: list[anthropic.AsyncAnthropic] = []

    async def build(api_key: str = "x", **kwargs: Any) -> tuple[Edge, anthropic.AsyncAnthropic]:
        edge: Edge = await make_edge(**kwargs)
        client = anthropic.AsyncAnthropic(base_url=edge.server_url, api_key=api_key, max_retries=0)
        clients.append(client)
        return edge, client

    yield build
    for client in clients:
        await client.close()


@pytest.fixture
async def client(make_client: MakeClient) -> tuple[Edge, anthropic.AsyncAnthropic]:
    return await make_client()


async def test_a_message_not_streamed(client: tuple[Edge, anthropic.AsyncAnthropic]) -> None:
    edge, sdk = client
    message = await sdk.messages.create(model=MODEL, max_tokens=100, messages=ASK, extra_body=SAMPLING)
    assert message.type == "message" and message.role == "assistant" and message.model == MODEL
    assert message.id.startswith("msg_")
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == TEXT  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.input_tokens == 2 and message.usage.output_tokens == 8
    sampling = edge.cortex.slots[MODEL].loaded.requests[-1].sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.max_tokens) == (0.5, 0.9, 3, 100)


async def test_a_message_streamed_reassembles(client: tuple[Edge, anthropic.AsyncAnthropic]) -> None:
    _, sdk = client
    async with sdk.messages.stream(model=MODEL, max_tokens=100, messages=ASK) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == TEXT
    assert final.content[0].text == TEXT  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == 2 and final.usage.output_tokens == 8

    events = await sdk.messages.create(model=MODEL, max_tokens=100, messages=ASK, stream=True)
    kinds = [e.type async for e in events]
    assert kinds[:3] == ["message_start", "content_block_start", "content_block_delta"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]


async def test_named_events_on_the_wire(client: tuple[Edge, anthropic.AsyncAnthropic]) -> None:
    edge, _ = client
    body = {"model": MODEL, "max_tokens": 50, "messages": ASK, "stream": True}
    async with aiohttp.ClientSession() as session, session.post(f"{edge.base_url}/messages", json=body) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        raw = (await r.read()).decode()
    frames = [f for f in raw.split("\n\n") if f.strip() and not f.startswith(":")]
    names = [f.split("\n")[0].removeprefix("event: ") for f in frames]
    assert names[:2] == ["message_start", "ping"]
    for frame in frames:
        name, data = frame.split("\n")
        assert json.loads(data.removeprefix("data: "))["type"] == name.removeprefix("event: ")


async def test_system_prompt_strings_and_blocks(client: tuple[Edge, anthropic.AsyncAnthropic]) -> None:
    edge, sdk = client
    model = edge.cortex.slots[MODEL].loaded
    await sdk.messages.create(model=MODEL, max_tokens=10, system="Be brief.", messages=ASK)
    sent = model.requests[-1].messages or ()
    assert [(m.role, m.content) for m in sent] == [("system", "Be brief."), ("user", "Say hello")]
    await sdk.messages.create(
        model=MODEL,
        max_tokens=10,
        system=[{"type": "text", "text": "One."}, {"type": "text", "text": "Two."}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
    )
    sent = model.requests[-1].messages or ()
    assert [(m.role, m.content) for m in sent] == [("system", "One.\nTwo."), ("user", "Hi")]


async def test_stop_sequences(client: tuple[Edge, anthropic.AsyncAnthropic]) -> None:
    _, sdk = client
    message = await sdk.messages.create(
        model=MODEL, max_tokens=100, messages=ASK, stop_sequences=["?", " How"]
    )
    assert message.content[0].text == "Hello, world!"  # type: ignore[union-attr]
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == " How"
    async with sdk.messages.stream(model=MODEL, max_tokens=100, messages=ASK, stop_sequences=["!"]) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "Hello, world"
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == "!"


async def test_max_tokens_ends_with_stop_reason_max_tokens(
    client: tuple[Edge, anthropic.AsyncAnthropic],
) -> None:
    _, sdk = client
    message = await sdk.messages.create(model=MODEL, max_tokens=3, messages=ASK)
    assert message.content[0].text == "Hello, world"  # type: ignore[union-attr]
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 3
    async with sdk.messages.stream(model=MODEL, max_tokens=2, messages=ASK) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "max_tokens"
    # A cap beyond the model's context (as clients send to any model) means "until the context is full".
    message = await sdk.messages.create(model=MODEL, max_tokens=20_000, messages=ASK)
    assert message.stop_reason == "end_turn"


async def test_tools_give_tool_use_blocks(make_client: MakeClient) -> None:
    edge, sdk = await make_client(options={"tokens": HERMES})
    message = await sdk.messages.create(model=MODEL, max_tokens=200, messages=ASK, tools=TOOLS)
    assert message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["text", "tool_use", "tool_use"]
    assert message.content[0].text == "Checking."  # type: ignore[union-attr]
    uses = [b for b in message.content if b.type == "tool_use"]
    assert [(u.name, u.input) for u in uses] == [("get_weather", {"city": "Oslo"}), ("get_time", {})]
    assert all(u.id.startswith("toolu_") for u in uses)
    sent = edge.cortex.slots[MODEL].loaded.requests[-1]
    assert [t.name for t in sent.tools] == ["get_weather", "get_time"] and sent.tool_choice == "auto"
    assert sent.tools[0].parameters == TOOLS[0]["input_schema"]

    async with sdk.messages.stream(model=MODEL, max_tokens=200, messages=ASK, tools=TOOLS) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["text", "tool_use", "tool_use"]
    streamed = [(b.name, b.input) for b in final.content if b.type == "tool_use"]
    assert streamed == [("get_weather", {"city": "Oslo"}), ("get_time", {})]

    # tool_choice maps onto the engine's: any → required, tool → its name, none → no parsing.
    await sdk.messages.create(
        model=MODEL,
        max_tokens=10,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "tool", "name": "get_time"},
    )
    sent = edge.cortex.slots[MODEL].loaded.requests[-1]
    assert sent.tool_choice == "get_time" and not sent.parallel_tool_calls
    await sdk.messages.create(
        model=MODEL,
        max_tokens=10,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
    )
    sent = edge.cortex.slots[MODEL].loaded.requests[-1]
    assert sent.tool_choice == "required" and not sent.parallel_tool_calls
    message = await sdk.messages.create(
        model=MODEL, max_tokens=200, messages=ASK, tools=TOOLS, tool_choice={"type": "none"}
    )
    assert message.stop_reason == "end_turn" and [b.type for b in message.content] == ["text"]


async def test_the_tool_result_turn_is_accepted(client: tuple[Edge, anthropic.AsyncAnthropic]) -> None:
    edge, sdk = client
    conversation: list[MessageParam] = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny, 21 C"},
                {"type": "text", "text": "And tomorrow?"},
            ],
        },
    ]
    message = await sdk.messages.create(model=MODEL, max_tokens=50, messages=conversation, tools=TOOLS)
    assert message.stop_reason == "end_turn"
    sent = edge.cortex.slots[MODEL].loaded.requests[-1].messages or ()
    assert [m.role for m in sent] == ["user", "assistant", "tool", "user"]
    assert sent[1].content == "Checking." and sent[1].tool_calls[0].name == "get_weather"
    assert json.loads(sent[1].tool_calls[0].arguments) == {"city": "Oslo"}
    assert sent[2].tool_call_id == "toolu_1" and sent[2].content == "Sunny, 21 C"


async def test_count_tokens(client: tuple[Edge, anthropic.AsyncAnthropic]) -> None:
    _, sdk = client
    counted = await sdk.messages.count_tokens(model=MODEL, system="Be brief now.", messages=ASK)
    assert counted.input_tokens == 5  # the fake counts words: "Be brief now." + "Say hello"
    message = await sdk.messages.create(model=MODEL, max_tokens=5, system="Be brief now.", messages=ASK)
    assert message.usage.input_tokens == counted.input_tokens


async def test_errors_in_the_anthropic_envelope(client: tuple[Edge, anthropic.AsyncAnthropic]) -> None:
    edge, sdk = client
    with pytest.raises(anthropic.NotFoundError) as missing:
        await sdk.messages.create(model="no/such-model", max_tokens=10, messages=ASK)
    assert isinstance(missing.value.body, dict)
    assert missing.value.body["type"] == "error"
    assert missing.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as bad:
        await sdk.messages.create(model=MODEL, max_tokens=10, messages=ASK, extra_body={"temperature": 1.5})
    assert isinstance(bad.value.body, dict)
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    assert "temperature" in bad.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        await sdk.messages.create(model=MODEL, max_tokens=0, messages=ASK)
    with pytest.raises(anthropic.BadRequestError, match=r"messages\.0\.content\.0\.type"):
        await sdk.messages.create(
            model=MODEL,
            max_tokens=10,
            messages=[
                {"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "x", "input": {}}]}
            ],
        )

    async with aiohttp.ClientSession() as session:
        cases: list[tuple[str, bytes, str]] = [
            ("/messages", b"not json", ""),
            ("/messages", json.dumps({"model": MODEL, "messages": ASK}).encode(), "max_tokens"),
            ("/messages", json.dumps({"model": MODEL, "max_tokens": 5}).encode(), "messages"),
            ("/messages", json.dumps({"model": MODEL, "max_tokens": 5, "messages": []}).encode(), "messages"),
            (
                "/messages",
                json.dumps(
                    {"model": MODEL, "max_tokens": 5, "messages": ASK, "tools": [{"name": "t"}]}
                ).encode(),
                "tools.0.input_schema",
            ),
            ("/messages/count_tokens", json.dumps({"model": MODEL}).encode(), "messages"),
        ]
        for path, body, field in cases:
            async with session.post(f"{edge.base_url}{path}", data=body) as r:
                assert r.status == 400, (path, body)
                answer = await r.json()
                assert answer["type"] == "error" and answer["error"]["type"] == "invalid_request_error"
                assert set(answer["error"]) == {"type", "message"}
                assert field in answer["error"]["message"]
        async with session.get(f"{edge.base_url}/messages") as r:
            assert r.status == 405 and (await r.json())["type"] == "error"
        async with session.post(f"{edge.base_url}/chat/completions", data=b"{}") as r:
            assert "error" in await r.json() and r.status == 400  # the OpenAI envelope stays there


async def test_a_failure_mid_stream_is_an_error_event(make_client: MakeClient) -> None:
    _, sdk = await make_client(options={"fail_after_tokens": 2})
    with pytest.raises(anthropic.APIStatusError) as failed:
        async with sdk.messages.stream(model=MODEL, max_tokens=100, messages=ASK) as stream:
            async for _ in stream.text_stream:
                pass
    assert isinstance(failed.value.body, dict) and failed.value.body["error"]["type"] == "api_error"


async def test_x_api_key_with_client_keys(make_client: MakeClient) -> None:
    def keys(app: Any) -> None:
        app[appkeys.API_KEYS] = ("secret",)

    edge, sdk = await make_client(api_key="secret", configure=keys)
    message = await sdk.messages.create(model=MODEL, max_tokens=5, messages=ASK)
    assert message.stop_reason == "max_tokens"
    assert (await sdk.messages.count_tokens(model=MODEL, messages=ASK)).input_tokens == 2
    wrong = anthropic.AsyncAnthropic(base_url=edge.server_url, api_key="wrong", max_retries=0)
    async with wrong:
        with pytest.raises(anthropic.AuthenticationError) as refused:
            await wrong.messages.create(model=MODEL, max_tokens=5, messages=ASK)
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["error"]["type"] == "authentication_error"
    # x-api-key works on the OpenAI routes too (wherever a client key is checked).
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{edge.base_url}/models", headers={"x-api-key": "secret"}) as r,
    ):
        assert r.status == 200


async def test_models_in_the_anthropic_shape(client: tuple[Edge, anthropic.AsyncAnthropic]) -> None:
    edge, sdk = client
    page = await sdk.models.list()
    assert [m.id for m in page.data] == [MODEL]
    assert page.data[0].type == "model" and page.data[0].created_at.year >= 1970
    async with aiohttp.ClientSession() as session, session.get(f"{edge.base_url}/models") as r:
        assert (await r.json())["object"] == "list"  # without anthropic-version: OpenAI's


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)
_BLOCK = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "tool_use", "tool_result", "image", "thinking"])},
    optional={
        "text": _JSON,
        "id": _JSON,
        "name": _JSON,
        "input": _JSON,
        "tool_use_id": _JSON,
        "content": _JSON,
    },
)
_TURN = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant", "system"]),
        "content": st.text() | st.lists(_BLOCK, max_size=3),
    }
)
_BODY = st.fixed_dictionaries(
    {},
    optional={
        "model": st.just(MODEL) | _JSON,
        "max_tokens": st.integers(-2, 10) | _JSON,
        "messages": st.lists(_TURN, max_size=3) | _JSON,
        "system": _JSON | st.lists(_BLOCK, max_size=2),
        "stop_sequences": _JSON,
        "temperature": _JSON,
        "top_p": _JSON,
        "top_k": _JSON,
        "stream": _JSON,
        "tools": st.lists(
            st.dictionaries(st.sampled_from(["name", "input_schema", "type"]), _JSON), max_size=2
        )
        | _JSON,
        "tool_choice": st.dictionaries(st.sampled_from(["type", "name", "disable_parallel_tool_use"]), _JSON)
        | _JSON,
        "thinking": _JSON,
        "metadata": _JSON,
    },
)


@settings(max_examples=300, deadline=None)
@given(body=_BODY)
def test_any_body_parses_or_is_a_400_naming_why(body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()
    for parse in (anthropic_wire.parse_messages_request, anthropic_wire.parse_count_tokens_request):
        try:
            parse(raw)
        except InvalidRequest as exc:
            assert exc.status == 400 and exc.message
