"""What the OpenAI API asks of the engine, end to end on the shipped demo model through the real agent app:
`n` choices, logprobs, `echo`, prompts as token ids and lists (issue 13), with the openai SDK."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from pydantic import BaseModel, Field

from helexa.mesh.assembly import build_app
from helexa.mesh.config import load_config

MODEL = "helexa/demo"
ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me about functions."}]


@pytest.fixture
async def clients(
    aiohttp_server, tmp_path: Path
) -> AsyncIterator[tuple[openai.AsyncOpenAI, openai.AsyncOpenAI]]:
    config = load_config(
        ["--state-dir", str(tmp_path / "state"), "--name", "demo-node", "--no-mdns"], {"HOME": str(tmp_path)}
    )
    server = await aiohttp_server(await build_app(config))
    url = f"http://127.0.0.1:{server.port}/v1"
    strict = openai.AsyncOpenAI(base_url=url, api_key="none", _strict_response_validation=True)
    lax = openai.AsyncOpenAI(base_url=url, api_key="none")
    async with strict, lax:
        yield strict, lax


@pytest.mark.slow
async def test_n_choices_with_logprobs_streamed_and_not(
    clients: tuple[openai.AsyncOpenAI, openai.AsyncOpenAI],
) -> None:
    client, _ = clients
    reply = await client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        n=3,
        max_tokens=12,
        temperature=1.0,
        seed=11,
        logprobs=True,
        top_logprobs=2,
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    counts = []
    for choice in reply.choices:
        assert choice.logprobs is not None and choice.logprobs.content is not None
        counts.append(len(choice.logprobs.content))
        assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    assert reply.usage is not None and reply.usage.completion_tokens == sum(counts)
    texts = [c.message.content for c in reply.choices]
    assert len(set(texts)) > 1  # seed + index: different samples

    stream = await client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        n=3,
        max_tokens=12,
        temperature=1.0,
        seed=11,
        stream=True,
        stream_options={"include_usage": True},
    )
    streamed = {0: "", 1: "", 2: ""}
    usage = None
    async for chunk in stream:
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
        usage = chunk.usage or usage
    assert [streamed[i] for i in range(3)] == texts
    assert usage is not None and usage.completion_tokens == reply.usage.completion_tokens


@pytest.mark.slow
async def test_echo_with_logprobs_of_a_token_id_prompt(
    clients: tuple[openai.AsyncOpenAI, openai.AsyncOpenAI],
) -> None:
    """What lm-eval's loglikelihood sends: token ids, `echo`, `logprobs`, one new token."""
    client, lax = clients
    plain = await client.completions.create(
        model=MODEL, prompt="The function returns", max_tokens=1, temperature=0
    )
    assert plain.usage is not None
    ids = list(range(5, 5 + plain.usage.prompt_tokens))  # some token ids
    reply = await lax.completions.create(
        model=MODEL, prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0
    )
    choice = reply.choices[0]
    assert choice.logprobs is not None
    tokens, values = choice.logprobs.tokens or [], choice.logprobs.token_logprobs or []
    assert len(tokens) == len(ids) + 1 and len(values) == len(ids) + 1
    assert values[0] is None and all(v is not None and v <= 0 for v in values[1:])
    assert choice.text == "".join(tokens)  # the echoed prompt, then the new token
    assert choice.logprobs.text_offset == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    assert reply.usage is not None and reply.usage.prompt_tokens == len(ids)


@pytest.mark.slow
async def test_several_prompts_in_one_request(clients: tuple[openai.AsyncOpenAI, openai.AsyncOpenAI]) -> None:
    client, _ = clients
    alone = [
        await client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0)
        for p in ("Once upon a time", "The list")
    ]
    together = await client.completions.create(
        model=MODEL, prompt=["Once upon a time", "The list"], max_tokens=6, temperature=0, n=2, echo=True
    )
    assert [c.index for c in together.choices] == [0, 1, 2, 3]
    expected = ["Once upon a time" + alone[0].choices[0].text] * 2 + [
        "The list" + alone[1].choices[0].text
    ] * 2
    assert [c.text for c in together.choices] == expected
    assert together.usage is not None
    assert together.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone if a.usage)


class Pet(BaseModel):
    name: str = Field(max_length=20)
    legs: int = Field(ge=0, le=8)
    indoor: bool


@pytest.mark.slow
async def test_structured_output_with_the_sdk(clients: tuple[openai.AsyncOpenAI, openai.AsyncOpenAI]) -> None:
    client, _ = clients
    for seed in range(5):
        parsed = await client.chat.completions.parse(
            model=MODEL, messages=ASK, response_format=Pet, max_tokens=60, temperature=0.9, seed=seed
        )
        pet = parsed.choices[0].message.parsed
        assert isinstance(pet, Pet), parsed.choices[0].message.content
    reply = await client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        response_format={"type": "json_object"},
        max_tokens=60,
        n=4,
        seed=3,
        temperature=1.0,
    )
    for choice in reply.choices:
        assert isinstance(json.loads(choice.message.content or ""), dict)
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            response_format={
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}},
                },
            },
        )
    assert (
        isinstance(info.value.body, dict) and info.value.body["param"] == "response_format.json_schema.schema"
    )
