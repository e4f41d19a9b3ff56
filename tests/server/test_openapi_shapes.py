"""Our response bodies validated against OpenAI's published OpenAPI schemas.

The schemas we check against are the closure (over `$ref`) of the response types we produce, extracted
from OpenAI's spec (github.com/openai/openai-openapi, MIT licence) into `openai_schemas.json` beside
this file, with descriptions and examples dropped, so the tests run on a clean clone without the spec.
When the full spec is present (`OPENAI_SPEC_PATH`), a test checks the extract is still current;
regenerate it with `python -m tests.server.test_openapi_shapes`.

A small JSON-schema checker (type, required, properties, items, enum, anyOf/oneOf/allOf, $ref, and
OpenAPI 3.0's `nullable`) is enough for these schemas.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML ships no stubs; types-PyYAML is not installed

from helexa.engine.base import ModelId, Usage
from helexa.mesh.errors import ModelUnavailable, error_envelope
from helexa.mesh.fleet.records import NodeId
from helexa.mesh.routing.decisions import Location, ModelListing
from helexa.mesh.server import openai_wire

from .conftest import Edge

# The published spec lies in ../shared beside the checkout (CI and developers alike).
_SPEC_CANDIDATES = [
    Path(__file__).resolve().parents[2].parent / "shared" / "openai-openapi" / "openapi.yaml",
    Path("/work/shared/openai-openapi/openapi.yaml"),
]
OPENAI_SPEC_PATH = next((p for p in _SPEC_CANDIDATES if p.exists()), _SPEC_CANDIDATES[0])
EXTRACT_PATH = Path(__file__).with_name("openai_schemas.json")
ROOTS = (
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",
    "ListModelsResponse",
    "Model",
    "ErrorResponse",
)
_DROPPED_KEYS = frozenset({"description", "example", "examples", "x-oaiMeta", "title", "deprecated"})

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


def extract_schemas(spec: dict[str, Any]) -> dict[str, Any]:
    """The `ROOTS` schemas and everything they reference, without prose."""
    every = spec["components"]["schemas"]
    seen: set[str] = set(ROOTS)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref":
                    name = value.rsplit("/", 1)[-1]
                    if name not in seen:
                        seen.add(name)
                        walk(every[name])
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for root in ROOTS:
        walk(every[root])

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in _DROPPED_KEYS}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return {name: strip(every[name]) for name in sorted(seen)}


def _load_spec() -> dict[str, Any]:
    with OPENAI_SPEC_PATH.open("rb") as f:
        return yaml.load(f, Loader=yaml.CSafeLoader)


@pytest.fixture(scope="session")
def schemas() -> dict[str, Any]:
    data = json.loads(EXTRACT_PATH.read_text())
    return data["schemas"]


@pytest.mark.skipif(not OPENAI_SPEC_PATH.exists(), reason="OpenAI's full spec is not on this machine")
def test_extract_matches_the_published_spec(schemas: dict[str, Any]) -> None:
    assert extract_schemas(_load_spec()) == schemas


def validate(value: Any, schema: dict[str, Any], schemas: dict[str, Any], path: str = "$") -> list[str]:
    """Errors of `value` against `schema` (an empty list when it conforms)."""
    if "$ref" in schema:
        return validate(value, schemas[schema["$ref"].rsplit("/", 1)[-1]], schemas, path)
    if value is None and schema.get("nullable"):  # OpenAPI 3.0 spelling, still used in places
        return []
    errors: list[str] = []
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = [validate(value, option, schemas, path) for option in schema[key]]
            if all(options):
                errors.append(f"{path}: matches none of {key}: {options}")
    for option in schema.get("allOf", ()):
        errors.extend(validate(value, option, schemas, path))
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        ok = any(
            isinstance(value, _JSON_TYPES[k]) and not (k in ("integer", "number") and isinstance(value, bool))
            for k in kinds
        )
        if not ok:
            return [*errors, f"{path}: expected {kind}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if isinstance(value, dict):
        errors.extend(
            f"{path}: missing required '{name}'" for name in schema.get("required", ()) if name not in value
        )
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                errors.extend(validate(value[name], sub, schemas, f"{path}.{name}"))
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors.extend(validate(item, schema["items"], schemas, f"{path}[{i}]"))
    return errors


def test_validator_catches_bad_shapes(schemas: dict[str, Any]) -> None:
    """The checker itself must be able to fail, or the tests below prove nothing."""
    good = orjson.loads(
        openai_wire.chat_completion(
            id="c",
            model="m",
            created=1,
            text="t",
            finish_reason="stop",
            usage=Usage(prompt_tokens=1, completion_tokens=1),
        )
    )
    assert validate(good, {"$ref": "#/components/schemas/CreateChatCompletionResponse"}, schemas) == []
    bad = {**good, "created": "yesterday"}
    del bad["id"]
    bad["choices"] = [{**good["choices"][0], "finish_reason": "bored"}]
    errors = validate(bad, {"$ref": "#/components/schemas/CreateChatCompletionResponse"}, schemas)
    assert any("created" in e for e in errors)
    assert any("'id'" in e for e in errors)
    assert any("bored" in e for e in errors)


def _check(value: Any, name: str, schemas: dict[str, Any]) -> None:
    assert validate(value, {"$ref": f"#/components/schemas/{name}"}, schemas) == []


async def test_served_bodies_match_the_spec(edge: Edge, schemas: dict[str, Any]) -> None:
    chat = {"model": "test/tiny-chat", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{edge.base_url}/chat/completions", json=chat) as resp:
            _check(await resp.json(), "CreateChatCompletionResponse", schemas)
        async with session.post(
            f"{edge.base_url}/completions", json={"model": "tiny", "prompt": "x"}
        ) as resp:
            _check(await resp.json(), "CreateCompletionResponse", schemas)
        async with session.get(f"{edge.base_url}/models") as resp:
            _check(await resp.json(), "ListModelsResponse", schemas)
        async with session.get(f"{edge.base_url}/models/test/tiny-chat") as resp:
            _check(await resp.json(), "Model", schemas)
        async with session.post(f"{edge.base_url}/chat/completions", json={**chat, "n": 129}) as resp:
            _check(await resp.json(), "ErrorResponse", schemas)
        several = {**chat, "n": 3, "logprobs": True, "top_logprobs": 2}
        async with session.post(f"{edge.base_url}/chat/completions", json=several) as resp:
            body = await resp.json()
            _check(body, "CreateChatCompletionResponse", schemas)
            assert [c["index"] for c in body["choices"]] == [0, 1, 2]
        echoed = {"model": "tiny", "prompt": ["x", "y"], "n": 2, "logprobs": 1, "echo": True}
        async with session.post(f"{edge.base_url}/completions", json=echoed) as resp:
            body = await resp.json()
            _check(body, "CreateCompletionResponse", schemas)
            assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]


def test_built_bodies_match_the_spec(schemas: dict[str, Any]) -> None:
    usage = Usage(prompt_tokens=3, completion_tokens=4)
    _check(
        orjson.loads(
            openai_wire.text_completion(
                id="c", model="m", created=1, text="", finish_reason="length", usage=usage
            )
        ),
        "CreateCompletionResponse",
        schemas,
    )
    for chunk in (
        openai_wire.chat_chunk(id="c", model="m", created=1, content="", role=True),
        openai_wire.chat_chunk(id="c", model="m", created=1, content="x"),
        openai_wire.chat_chunk(id="c", model="m", created=1, finish_reason="stop"),
        openai_wire.chat_usage_chunk(id="c", model="m", created=1, usage=usage),
    ):
        _check(orjson.loads(chunk), "CreateChatCompletionStreamResponse", schemas)
    listing = ModelListing(
        id=ModelId("a/b"),
        created=5,
        owned_by="helexa",
        status="loaded",
        feasible_on=("n",),
        locations=(Location(node=NodeId("i"), node_name="n", status="loaded", memory_mb=3, in_flight=0),),
    )
    _check(orjson.loads(openai_wire.model_json(listing)), "Model", schemas)
    _check(error_envelope(ModelUnavailable("x", reason="draining")), "ErrorResponse", schemas)


if __name__ == "__main__":
    EXTRACT_PATH.write_text(
        json.dumps(
            {
                "_source": "https://github.com/openai/openai-openapi openapi.yaml, components.schemas subset",
                "_license": "MIT, Copyright (c) OpenAI",
                "schemas": extract_schemas(_load_spec()),
            },
            indent=1,
            sort_keys=True,
        )
        + "\n"
    )
