"""Our non-streamed response bodies validated against OpenAI's published OpenAPI schemas.

A small JSON-schema checker (type, required, properties, items, enum, anyOf/oneOf/allOf, $ref) is
enough for the response schemas we produce (plus OpenAPI 3.0's `nullable`); the spec is read once per
session with PyYAML's C loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML ships no stubs; types-PyYAML is not installed

from engine.base import ModelId, Usage
from mesh import protocol
from mesh.errors import ModelUnavailable, error_envelope
from mesh.records import NodeId
from mesh.routing import Location, ModelListing

from .conftest import Edge

SPEC_PATH = Path("/work/shared/openai-openapi/openapi.yaml")
if not SPEC_PATH.exists():  # the repository may travel without the shared folder
    SPEC_PATH = Path(__file__).resolve().parents[3] / "shared" / "openai-openapi" / "openapi.yaml"

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


@pytest.fixture(scope="session")
def schemas() -> dict[str, Any]:
    if not SPEC_PATH.exists():
        pytest.fail(f"OpenAI spec not found at {SPEC_PATH}")
    with SPEC_PATH.open("rb") as f:
        spec = yaml.load(f, Loader=yaml.CSafeLoader)
    return spec["components"]["schemas"]


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
        protocol.chat_completion(
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
    import aiohttp

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
        async with session.post(f"{edge.base_url}/chat/completions", json={**chat, "n": 3}) as resp:
            _check(await resp.json(), "ErrorResponse", schemas)


def test_built_bodies_match_the_spec(schemas: dict[str, Any]) -> None:
    usage = Usage(prompt_tokens=3, completion_tokens=4)
    _check(
        orjson.loads(
            protocol.text_completion(
                id="c", model="m", created=1, text="", finish_reason="length", usage=usage
            )
        ),
        "CreateCompletionResponse",
        schemas,
    )
    for chunk in (
        protocol.chat_chunk(id="c", model="m", created=1, content="", role=True),
        protocol.chat_chunk(id="c", model="m", created=1, content="x"),
        protocol.chat_chunk(id="c", model="m", created=1, finish_reason="stop"),
        protocol.chat_usage_chunk(id="c", model="m", created=1, usage=usage),
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
    _check(orjson.loads(protocol.model_json(listing)), "Model", schemas)
    _check(error_envelope(ModelUnavailable("x", reason="draining")), "ErrorResponse", schemas)
