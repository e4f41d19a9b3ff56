"""Tool calling on a real (tiny, random-weight) transformers model whose chat template renders tools in
the Hermes form: `tool_choice` "required" and a named function are enforced by constrained decoding, so
every output is a valid call of an offered function with arguments valid under its parameters; "none"
renders no tools; a model whose template has no tools is taught them in a system turn."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

from helexa.catalogue.validate import builtin_path
from helexa.engine.base import (
    ChatMessage,
    GenerationRequest,
    LoadSpec,
    ModelId,
    RequestId,
    SamplingParams,
    ToolCall,
    ToolSpec,
)
from helexa.engine.testing import TOOLS_CHAT_TEMPLATE, build_tiny_model
from helexa.engine.toolcalls import parse_all
from helexa.engine.transformers_engine import TransformersEngine, TransformersModel
from tests.helpers.engine import collect

from .conftest import load_sync

WEATHER = ToolSpec(
    name="get_weather",
    description="The weather in a city",
    parameters={
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 12},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "days"],
        "additionalProperties": False,
    },
)
TIME = ToolSpec(
    name="get_time", parameters={"type": "object", "properties": {}, "additionalProperties": False}
)


@pytest.fixture(scope="module")
def tools_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransformersModel]:
    path = build_tiny_model(
        tmp_path_factory.mktemp("tiny-tools"), chat_template=TOOLS_CHAT_TEMPLATE, context_length=2048, seed=5
    )
    model = load_sync(path)
    yield model
    asyncio.run(model.unload())


def _ask(
    choice: str, seed: int, *, parallel: bool = True, messages: tuple[ChatMessage, ...] | None = None
) -> GenerationRequest:
    return GenerationRequest(
        request_id=RequestId(f"t{seed}"),
        messages=messages or (ChatMessage(role="user", content="What is the weather in Oslo?"),),
        sampling=SamplingParams(temperature=1.0, seed=seed, max_tokens=240),
        tools=(WEATHER, TIME),
        tool_choice=choice,
        parallel_tool_calls=parallel,
    )


def _valid(name: str, arguments: str) -> bool:
    args = json.loads(arguments)
    if name == "get_time":
        return args == {}
    return set(args) == {"city", "days"} and isinstance(args["city"], str) and 1 <= args["days"] <= 7


@pytest.mark.parametrize("choice", ["required", "get_weather"])
async def test_required_and_named_choices_always_give_valid_calls(
    tools_model: TransformersModel, choice: str
) -> None:
    results = await asyncio.gather(
        *(collect(tools_model, _ask(choice, seed, parallel=seed % 2 == 0)) for seed in range(16))
    )
    for seed, (text, final) in enumerate(results):
        content, calls = parse_all(text)
        assert calls, text
        assert content == ""
        assert all(_valid(c.name, c.arguments) for c in calls), text
        if choice != "required":
            assert [c.name for c in calls] == [choice]
        if seed % 2:  # parallel_tool_calls false: exactly one
            assert len(calls) == 1
        assert final.finish_reason == "stop"


async def test_the_tool_result_turn_and_none_render(tools_model: TransformersModel) -> None:
    conversation = (
        ChatMessage(role="user", content="Weather in Oslo?"),
        ChatMessage(
            role="assistant",
            content="",
            tool_calls=(ToolCall(id="call_1", name="get_weather", arguments='{"city": "Oslo", "days": 1}'),),
        ),
        ChatMessage(role="tool", content="Sunny", tool_call_id="call_1"),
    )
    with_tools = tools_model._prepare(_ask("auto", 0, messages=conversation))
    without = tools_model._prepare(_ask("none", 0, messages=conversation))
    assert len(with_tools) > len(without)  # "none" renders no tools; the call and its result render in both
    _, final = await collect(tools_model, _ask("auto", 1, messages=conversation))
    assert final.usage.prompt_tokens == len(with_tools)


async def test_a_model_without_a_tools_template_is_taught_them_in_a_system_turn() -> None:
    """The demo model's template renders no tools: they reach it in the generic system turn (Hermes
    markup), "required" still gives valid calls of them, and "none" leaves them out."""
    demo = await TransformersEngine().load(
        LoadSpec(model_id=ModelId("demo"), source=str(builtin_path("demo")))
    )
    try:
        tokenizer = demo._runtime.tokenizer if demo._runtime is not None else None
        assert tokenizer is not None
        with_tools = tokenizer.decode(demo._prepare(_ask("auto", 0)))
        assert "<tools>" in with_tools and '"name": "get_weather"' in with_tools
        without = tokenizer.decode(demo._prepare(_ask("none", 0)))
        assert "<tools>" not in without and "get_weather" not in without
        for seed in range(4):
            text, final = await collect(demo, _ask("required", seed, parallel=False))
            content, calls = parse_all(text)
            assert content == "" and len(calls) == 1, text
            assert _valid(calls[0].name, calls[0].arguments), text
        _, final = await collect(demo, _ask("none", 0))
        assert final.usage.completion_tokens > 0
    finally:
        await demo.unload()


async def test_count_tokens_is_the_prompt_generate_reads(tools_model: TransformersModel) -> None:
    request = _ask("auto", 2)
    counted = await asyncio.to_thread(tools_model.count_tokens, request)
    _, final = await collect(tools_model, request)
    assert counted == final.usage.prompt_tokens == len(tools_model._prepare(request))
