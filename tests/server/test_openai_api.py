"""The OpenAI endpoints driven by the official openai SDK (strict response validation where it can)."""

from __future__ import annotations

from typing import Any, cast

import openai
import pytest

from helexa.mesh.errors import ModelUnavailable
from helexa.mesh.server import appkeys

from .conftest import DEFAULT_TOKENS, Edge

MODEL = "test/tiny-chat"
FULL_TEXT = "".join(DEFAULT_TOKENS)


async def test_chat_non_stream(edge: Edge) -> None:
    reply = await edge.client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": "Really brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": None},
            {"role": "user", "content": "Again"},
        ],
    )
    assert reply.object == "chat.completion"
    assert reply.model == MODEL
    assert reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == FULL_TEXT
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    # The fake engine counts prompt words: "Be brief. Really brief. Hi there Again" is 7.
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (7, len(DEFAULT_TOKENS))
    assert reply.usage.total_tokens == 7 + len(DEFAULT_TOKENS)
    sent = edge.cortex.slots[MODEL].loaded.requests[-1]
    assert sent.messages is not None
    assert [m.role for m in sent.messages] == ["system", "developer", "user", "assistant", "user"]
    assert sent.messages[2].content == "Hi\nthere"
    assert sent.messages[3].content == ""


async def test_catalogue_defaults_apply_and_request_values_win(edge: Edge) -> None:
    model = edge.cortex.slots[MODEL].loaded
    await edge.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    defaulted = model.requests[-1].sampling
    assert (defaulted.temperature, defaulted.top_k, defaulted.top_p) == (0.25, 7, 1.0)
    assert defaulted.max_tokens is None and defaulted.seed is None and defaulted.stop == ()

    reply = await edge.client.chat.completions.create(
        model="tiny",  # alias
        messages=[{"role": "user", "content": "x"}],
        temperature=0.0,
        top_p=0.5,
        seed=42,
        stop=["How", "zzz"],
        max_completion_tokens=3,
        extra_body={"top_k": 3},
    )
    sampling = model.requests[-1].sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed) == (0.0, 0.5, 3, 42)
    assert sampling.stop == ("How", "zzz")
    assert sampling.max_tokens == 3
    assert reply.model == MODEL  # the canonical id, not the alias
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content == "".join(DEFAULT_TOKENS[:3])


async def test_max_tokens_and_stop_passthrough(edge: Edge) -> None:
    reply = await edge.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2, stop="world"
    )
    sampling = edge.cortex.slots[MODEL].loaded.requests[-1].sampling
    assert sampling.max_tokens == 2 and sampling.stop == ("world",)
    assert reply.choices[0].message.content == "Hello,"


async def test_chat_stream_with_usage(edge: Edge) -> None:
    stream = await edge.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == FULL_TEXT
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens == len(DEFAULT_TOKENS)
    assert all(c.id == chunks[0].id for c in chunks)


async def test_chat_stream_without_usage_has_no_usage_chunk(edge: Edge) -> None:
    stream = await edge.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


async def test_completions_non_stream(edge: Edge) -> None:
    reply = await edge.client.completions.create(model=MODEL, prompt="Once upon", max_tokens=4)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == "".join(DEFAULT_TOKENS[:4])
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 4
    assert edge.cortex.slots[MODEL].loaded.requests[-1].prompt == "Once upon"


async def test_completions_prompt_null_is_a_new_document(edge: Edge) -> None:
    """Issue 12 item 11: OpenAI's spec makes `prompt` nullable (`null`: generate as from the start of a
    new document); it was refused with a 400."""
    reply = await edge.client.completions.create(model=MODEL, prompt=None, max_tokens=2)
    assert reply.choices[0].text == "".join(DEFAULT_TOKENS[:2])
    assert edge.cortex.slots[MODEL].loaded.requests[-1].prompt == ""


async def test_completions_stream_with_usage(edge: Edge) -> None:
    stream = await edge.lax_client.completions.create(
        model=MODEL, prompt="Once", stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == FULL_TEXT
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None


async def test_models_list_and_retrieve(edge: Edge) -> None:
    edge.cortex.add("Org/Other-Model-7B")
    page = await edge.client.models.list()
    ids = sorted(m.id for m in page.data)
    assert ids == ["Org/Other-Model-7B", MODEL]
    model = await edge.client.models.retrieve("Org/Other-Model-7B")
    assert model.id == "Org/Other-Model-7B" and model.object == "model" and model.owned_by == "helexa"
    extra = model.model_dump()
    assert extra["status"] == "unloaded" and extra["loaded"] is False
    assert extra["feasible_on"] == ["test-node"] and extra["locations"] == []
    loaded = (await edge.client.models.retrieve(MODEL)).model_dump()
    assert loaded["loaded"] is True
    assert loaded["locations"][0]["node"] == "test-node"
    with pytest.raises(openai.NotFoundError) as caught:
        await edge.client.models.retrieve("nope/missing")
    assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]


async def test_unknown_model_is_404(edge: Edge) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await edge.client.chat.completions.create(
            model="no/such", messages=[{"role": "user", "content": "x"}]
        )
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["code"] == "model_not_found" and body["param"] == "model" and body["type"]


async def test_model_unavailable_is_503_with_retry_after(edge: Edge) -> None:
    edge.cortex.slots[MODEL].unavailable = ModelUnavailable(
        "no node has room for this model", reason="infeasible", retry_after_s=7
    )
    with pytest.raises(openai.InternalServerError) as caught:
        await edge.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.body["code"] == "model_unavailable"  # type: ignore[index]
    # The same for a stream that fails before anything was sent: a real status, not a 200 + error event.
    with pytest.raises(openai.InternalServerError):
        await edge.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True
        )


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"top_p": -0.5}, "top_p"),
        ({"n": 129}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -3}, "max_completion_tokens"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "sometimes"},
            "tool_choice",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"extra_body": {"top_k": "many"}}, "top_k"),
        ({"seed": 1.5}, "seed"),
    ],
)
async def test_invalid_chat_fields_name_the_field(edge: Edge, kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await edge.client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            **cast(Any, kwargs),
        )
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["param"] == param
    assert body["type"] == "invalid_request_error"
    assert body["message"]


async def test_invalid_message_names_the_message(edge: Edge) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await edge.client.chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "system", "content": "s"},
                {"role": "user", "content": "u"},
                cast(Any, {"role": "user", "content": None}),
            ],
        )
    assert caught.value.body["param"] == "messages[2].content"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as caught:
        await edge.client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        )
    assert caught.value.body["param"] == "messages[0].content[0].type"  # type: ignore[index]


async def test_max_tokens_beyond_context_length_is_400(edge: Edge) -> None:
    edge.cortex.add("small/ctx", context_length=100, defaults={"max_tokens": 5000})
    with pytest.raises(openai.BadRequestError) as caught:
        await edge.client.chat.completions.create(
            model="small/ctx", messages=[{"role": "user", "content": "x"}], max_completion_tokens=101
        )
    assert caught.value.body["param"] == "max_completion_tokens"  # type: ignore[index]
    assert caught.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    # A catalogue default beyond the context means "as much as fits", not an error.
    await edge.client.chat.completions.create(model="small/ctx", messages=[{"role": "user", "content": "x"}])
    sent = edge.cortex.slots["small/ctx"].model
    assert sent is not None and sent.requests[-1].sampling.max_tokens is None


async def test_engine_request_error_is_400_with_its_param(edge: Edge) -> None:
    edge.cortex.add("short/ctx", options={"context_length": 3})
    with pytest.raises(openai.BadRequestError) as caught:
        await edge.client.chat.completions.create(
            model="short/ctx", messages=[{"role": "user", "content": "one two three four"}]
        )
    body = caught.value.body
    assert isinstance(body, dict)
    assert (body["type"], body["param"], body["code"]) == (
        "invalid_request_error",
        "messages",
        "context_length_exceeded",
    )
    assert "context length" in body["message"]


async def test_engine_fault_is_500_without_leaking(edge: Edge) -> None:
    edge.cortex.add("faulty/model", options={"fail_after_tokens": 0})
    with pytest.raises(openai.InternalServerError) as caught:
        await edge.client.chat.completions.create(
            model="faulty/model", messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.body["code"] == "model_failed"  # type: ignore[index]
    assert "faulty/model failed" not in str(caught.value.body)  # the engine's own words stay in the log


async def test_mid_stream_failure_raises_in_the_sdk(edge: Edge) -> None:
    edge.cortex.add("faulty/model", options={"fail_after_tokens": 2})
    stream = await edge.client.chat.completions.create(
        model="faulty/model", messages=[{"role": "user", "content": "x"}], stream=True
    )
    received: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            if chunk.choices:
                received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "".join(DEFAULT_TOKENS[:2])
    assert caught.value.body["code"] == "model_failed"  # type: ignore[index]
    assert "scripted fault" not in caught.value.message


async def test_api_keys(make_edge) -> None:
    def configure(app):
        app[appkeys.API_KEYS] = ("k-one", "k-two")

    edge = await make_edge(configure, api_key="wrong")
    with pytest.raises(openai.AuthenticationError) as caught:
        await edge.client.models.list()
    assert caught.value.body["code"] == "invalid_api_key"  # type: ignore[index]
    good = openai.AsyncOpenAI(base_url=edge.base_url, api_key="k-two", max_retries=0)
    try:
        assert (await good.models.list()).data
        reply = await good.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert reply.choices[0].message.content == FULL_TEXT
    finally:
        await good.close()
