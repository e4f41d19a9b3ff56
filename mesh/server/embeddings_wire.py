"""The wire format of `POST /v1/embeddings` (OpenAI's): parsing the body, building the answer.

    {"model": "bge-small", "input": "text" | ["a", "b"] | [1, 2, 3] | [[1, 2], [3]],
     "encoding_format": "float" | "base64", "dimensions": 256, "user": "..."}
    → {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [...] | "<base64>"}],
       "model": "...", "usage": {"prompt_tokens": n, "total_tokens": n}}

`base64` (the openai SDK's default) is the vector as little-endian float32, base64-encoded. Every error
is a 400 naming its field (`mesh.errors.InvalidRequest`).
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from helexa.engine.base import EmbedInput
from helexa.mesh.errors import InvalidRequest
from helexa.mesh.server.openai_wire import (
    common_fields,
    decode_body,
    integer_field,
    invalid_type,
    model_field,
    optional_str_field,
)

__all__ = [
    "MAX_DIMENSIONS",
    "MAX_INPUTS",
    "EmbeddingsRequest",
    "embeddings_response",
    "parse_embeddings_request",
]

EncodingFormat = Literal["float", "base64"]

# OpenAI's limit on the inputs of one request.
MAX_INPUTS = 2048
# Far above any model's vectors; the model itself checks `dimensions` against its own size.
MAX_DIMENSIONS = 65536
_MAX_TOKEN_ID = 2**31 - 1
_FORMATS: tuple[EncodingFormat, ...] = ("float", "base64")


@dataclass(frozen=True, kw_only=True, slots=True)
class EmbeddingsRequest:
    model: str
    inputs: tuple[EmbedInput, ...]
    encoding_format: EncodingFormat = "float"
    dimensions: int | None = None


def parse_embeddings_request(body: bytes) -> EmbeddingsRequest:
    """Parse and validate a `POST /v1/embeddings` body."""
    data = decode_body(body)
    model = model_field(data)
    inputs = _inputs(data)
    fmt = optional_str_field(data, "encoding_format") or "float"
    if fmt not in _FORMATS:
        raise InvalidRequest(
            f"'encoding_format' must be one of {', '.join(_FORMATS)}, got {fmt!r}.",
            param="encoding_format",
            code="invalid_value",
        )
    dimensions = integer_field(data, "dimensions", 1, MAX_DIMENSIONS)
    common_fields(data)
    return EmbeddingsRequest(
        model=model,
        inputs=inputs,
        encoding_format="base64" if fmt == "base64" else "float",
        dimensions=dimensions,
    )


def _token_ids(value: list[Any], param: str) -> tuple[int, ...]:
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _MAX_TOKEN_ID:
            raise invalid_type(f"{param}[{i}]", "a token id (a non-negative integer)", v)
    return tuple(value)


def _inputs(data: dict[str, Any]) -> tuple[EmbedInput, ...]:
    """A string, a list of strings, a list of token ids or a list of token-id lists; never empty."""
    value = data.get("input")
    if value is None:
        raise InvalidRequest(
            "Missing required parameter: 'input'.", param="input", code="missing_required_parameter"
        )
    expected = "a string, an array of strings, an array of token ids or an array of token-id arrays"
    if isinstance(value, str):
        if not value:
            raise InvalidRequest("'input' must not be an empty string.", param="input", code="invalid_value")
        return (value,)
    if not isinstance(value, list):
        raise invalid_type("input", expected, value)
    if not value:
        raise InvalidRequest("'input' must not be an empty array.", param="input", code="invalid_value")
    if len(value) > MAX_INPUTS:
        raise InvalidRequest(
            f"'input' may hold at most {MAX_INPUTS} inputs, got {len(value)}.",
            param="input",
            code="invalid_value",
        )
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return (_token_ids(value, "input"),)
    out: list[EmbedInput] = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            if not item:
                raise InvalidRequest(
                    f"'input[{i}]' must not be an empty string.", param=f"input[{i}]", code="invalid_value"
                )
            out.append(item)
        elif isinstance(item, list) and item:
            out.append(_token_ids(item, f"input[{i}]"))
        else:
            raise invalid_type(f"input[{i}]", "a non-empty string or a non-empty array of token ids", item)
    return tuple(out)


def _encode(vector: Sequence[float], fmt: EncodingFormat) -> list[float] | str:
    if fmt == "float":
        return list(vector)
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def embeddings_response(
    *, model: str, vectors: Sequence[Sequence[float]], encoding_format: EncodingFormat, prompt_tokens: int
) -> bytes:
    """The JSON answer: one `embedding` object per vector, in input order."""
    return orjson.dumps(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": _encode(v, encoding_format)}
                for i, v in enumerate(vectors)
            ],
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
    )
