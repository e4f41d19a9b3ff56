"""Hypothesis properties of the wire layer: parsing never fails except with a 400 that names a field,
sampling resolution, the error hierarchy; and random bodies against a live server never give a 5xx."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helexa.engine import errors as engine_errors
from helexa.engine.base import SamplingParams
from helexa.mesh import errors
from helexa.mesh.errors import InvalidRequest
from helexa.mesh.server import openai_wire

from .conftest import Edge

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = (
    "model", "messages", "prompt", "temperature", "top_p", "top_k", "seed", "max_tokens",
    "max_completion_tokens", "stop", "n", "stream", "stream_options", "user", "metadata", "tools",
    "logprobs", "response_format", "echo", "best_of", "suffix", "presence_penalty", "logit_bias",
    "tool_choice",
)  # fmt: skip
messages = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "role": st.sampled_from(["system", "user", "assistant", "tool", "developer", "bot"])
            | json_values,
            "content": st.text(max_size=6)
            | st.none()
            | st.lists(
                st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": json_values})
            ),
            "name": json_values,
        },
    ),
    max_size=3,
)
# Bodies shaped like requests (known fields with random values) mixed with wholly random JSON.
request_like = st.fixed_dictionaries(
    {"model": st.sampled_from(["test/tiny-chat", "tiny", "nope"]) | json_values},
    optional={name: json_values for name in FIELDS if name != "model"} | {"messages": messages},
)
bodies = st.one_of(
    # The stdlib encoder (orjson refuses integers past 64 bits; we want the server to see them).
    request_like.map(lambda v: json.dumps(v).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=40),
)


@given(body=bodies)
@settings(max_examples=150, deadline=None)
def test_parsing_either_succeeds_or_raises_invalid_request(body: bytes) -> None:
    for parse in (openai_wire.parse_chat_request, openai_wire.parse_completion_request):
        try:
            parse(body)
        except InvalidRequest as exc:
            assert exc.status == 400 and exc.message
            envelope = errors.error_envelope(exc)["error"]
            assert envelope["type"] == "invalid_request_error"


@given(
    temperature=st.none() | st.floats(0, 2),
    top_k=st.none() | st.integers(0, 100),
    max_tokens=st.none() | st.integers(1, 10_000),
    defaults=st.dictionaries(
        st.sampled_from(["temperature", "top_p", "top_k", "max_tokens"]),
        st.integers(1, 50) | st.floats(0, 1),
        max_size=4,
    ),
)
def test_resolve_sampling_request_wins_then_defaults_then_base(
    temperature: float | None, top_k: int | None, max_tokens: int | None, defaults: dict[str, Any]
) -> None:
    overrides = openai_wire.SamplingOverrides(temperature=temperature, top_k=top_k, max_tokens=max_tokens)
    params = openai_wire.resolve_sampling(overrides, defaults)
    base = SamplingParams()

    def expect(given_value: Any, name: str, fallback: Any) -> Any:
        if given_value is not None:
            return given_value
        return defaults.get(name, fallback)

    assert params.temperature == expect(temperature, "temperature", base.temperature)
    assert params.top_p == defaults.get("top_p", base.top_p)
    assert params.top_k == int(expect(top_k, "top_k", base.top_k))
    expected_max = expect(max_tokens, "max_tokens", base.max_tokens)
    assert params.max_tokens == (None if expected_max is None else int(expected_max))
    assert isinstance(params.temperature, float) and isinstance(params.top_k, int)


def test_parse_accepts_what_openai_accepts() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "a"},
            {"role": "system", "content": [{"type": "text", "text": "b"}]},
            {"role": "developer", "content": "c"},
            {"role": "user", "content": "d", "name": "ann"},
            {"role": "assistant", "content": None, "tool_calls": []},
            {"role": "assistant"},
            {"role": "tool", "content": "e", "tool_call_id": "t1"},
        ],
        "max_tokens": 5,
        "max_completion_tokens": 9,
        "stop": "x",
        "seed": -1,
        "top_k": -1,
        "n": 1,
        "user": "u",
        "metadata": {"k": "v"},
        "response_format": {"type": "text"},
        "tools": [],
        "tool_choice": "none",
        "something_new": {"we": "ignore"},
        "stream": False,
        "stream_options": {"include_usage": True},
    }
    request = openai_wire.parse_chat_request(orjson.dumps(body))
    assert [m.role for m in request.messages] == [
        "system", "system", "developer", "user", "assistant", "assistant", "tool",
    ]  # fmt: skip
    assert request.messages[3].name == "ann"
    assert request.sampling.max_tokens == 9 and request.sampling.max_tokens_param == "max_completion_tokens"
    assert request.sampling.stop == ("x",) and request.sampling.top_k == 0 and request.sampling.seed == -1
    assert request.include_usage and not request.stream
    completion = openai_wire.parse_completion_request(
        b'{"model": "m", "prompt": ["only one"], "max_tokens": 2.0}'
    )
    assert completion.prompt == "only one" and completion.sampling.max_tokens == 2


def test_error_hierarchy_statuses_and_headers() -> None:
    assert errors.ModelNotFound("x").status == 404 and errors.ModelNotFound("x").code == "model_not_found"
    assert isinstance(errors.ModelNotFound("x"), errors.NotFound)
    unavailable = errors.ModelUnavailable("busy", reason="draining", retry_after_s=2.2)
    assert unavailable.status == 503 and unavailable.headers() == {"Retry-After": "3"}
    assert unavailable.reason == "draining"
    assert errors.ModelLoadFailed().status == 503 and isinstance(
        errors.ModelLoadFailed(), errors.ModelUnavailable
    )
    assert errors.Overloaded().status == 429 and "Retry-After" in errors.Overloaded().headers()
    assert errors.Overloaded(status=503).status == 503 and errors.Overloaded().status == 429
    assert errors.UpstreamError().status == 502
    assert errors.PayloadTooLarge().status == 413 and errors.MethodNotAllowed().status == 405
    assert errors.Unauthorized().status == 401 and errors.InternalError().headers() == {}


@pytest.mark.parametrize(
    ("engine_error", "status", "code"),
    [
        (engine_errors.RequestError("bad stop", param="stop", code="invalid_value"), 400, "invalid_value"),
        (engine_errors.ContextLengthExceeded("too long"), 400, "context_length_exceeded"),
        (engine_errors.InsufficientMemory("needs 9 GB on cuda:0 of host-x"), 503, "model_unavailable"),
        (engine_errors.TransientLoadError("hub.example timed out"), 503, "model_load_failed"),
        (engine_errors.ModelSourceError("/srv/x/config.json missing"), 503, "model_load_failed"),
        (engine_errors.EngineFault("Xid 79 on gpu-3.lan"), 500, "model_failed"),
        (engine_errors.EngineError("??"), 500, "internal_error"),
    ],
)
def test_engine_errors_translate_without_leaking(
    engine_error: engine_errors.EngineError, status: int, code: str
) -> None:
    translated = errors.from_engine_error(engine_error)
    assert (translated.status, translated.code) == (status, code)
    if status != 400:
        assert str(engine_error) not in translated.message


async def test_random_bodies_never_get_a_5xx(edge: Edge) -> None:
    """Hypothesis drives sync examples from a worker thread; each posts to the live server on this loop."""
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:

        async def post(path: str, body: bytes) -> int:
            async with session.post(f"{edge.base_url}/{path}", data=body) as resp:
                await resp.read()
                return resp.status

        @given(body=bodies, path=st.sampled_from(["chat/completions", "completions"]))
        @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        def fuzz(body: bytes, path: str) -> None:
            status = asyncio.run_coroutine_threadsafe(post(path, body), loop).result(timeout=30)
            assert status < 500, (path, body)

        await asyncio.to_thread(fuzz)
