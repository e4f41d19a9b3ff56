"""Structured output by constrained decoding (llguidance) on the shipped demo model: every output parses,
and validates against its schema, also when batched; a schema that cannot be enforced is a RequestError
naming the field."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from pydantic import BaseModel, Field

from helexa.catalogue.validate import builtin_path
from helexa.engine.base import (
    ChatMessage,
    GenerationRequest,
    RequestId,
    ResponseFormat,
    SamplingParams,
)
from helexa.engine.errors import RequestError
from helexa.engine.transformers_engine import TransformersModel
from tests.helpers.engine import collect

from .conftest import load_sync


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)
    likes_tea: bool
    tags: list[str]


SCHEMA = ResponseFormat(type="json_schema", schema=Person.model_json_schema())
ANY_OBJECT = ResponseFormat(type="json_object")


@pytest.fixture(scope="module")
def demo() -> Iterator[TransformersModel]:
    model = load_sync(builtin_path("demo"))
    yield model
    asyncio.run(model.unload())


def _request(fmt: ResponseFormat, seed: int, max_tokens: int = 60) -> GenerationRequest:
    return GenerationRequest(
        request_id=RequestId(f"so{seed}"),
        messages=(ChatMessage(role="user", content="Describe a person as JSON."),),
        sampling=SamplingParams(temperature=0.0 if seed == 0 else 0.9, seed=seed, max_tokens=max_tokens),
        response_format=fmt,
    )


@pytest.mark.parametrize("fmt", [SCHEMA, ANY_OBJECT], ids=["json_schema", "json_object"])
async def test_every_output_parses_and_validates(demo: TransformersModel, fmt: ResponseFormat) -> None:
    requests = [_request(fmt, seed) for seed in range(24)]
    results = await asyncio.gather(*(collect(demo, r) for r in requests))  # batched together
    assert demo.peak_batch > 1
    for text, final in results:
        value = json.loads(text)
        assert isinstance(value, dict)
        if fmt is SCHEMA:
            Person.model_validate(value)
        assert final.finish_reason == "stop"  # the grammar completed within max_tokens


async def test_a_budget_too_short_for_the_json_says_length(demo: TransformersModel) -> None:
    """No grammar can make an object fit in 6 tokens: the cut-off output is reported as such."""
    text, final = await collect(demo, _request(SCHEMA, 1, max_tokens=6))
    assert final.finish_reason == "length" and final.usage.completion_tokens == 6
    assert text.startswith('{"name":"')


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)y"}}},
        {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}},
        {"type": "strange"},
    ],
)
async def test_a_schema_that_cannot_be_enforced_is_refused(
    demo: TransformersModel, schema: dict[str, object]
) -> None:
    fmt = ResponseFormat(type="json_schema", schema=schema, param="response_format.json_schema.schema")
    with pytest.raises(RequestError) as info:
        await collect(demo, _request(fmt, 0))
    assert info.value.param == "response_format.json_schema.schema"
