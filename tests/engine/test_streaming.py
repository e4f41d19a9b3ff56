"""The request checks and stream plumbing every engine shares (`engine.streaming`)."""

from __future__ import annotations

import asyncio
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from helexa.engine.base import Delta, Final, GenerationRequest, ModelId, RequestId, SamplingParams, Usage
from helexa.engine.errors import ContextLengthExceeded, EngineError, EngineFault, RequestError
from helexa.engine.streaming import (
    EventChannel,
    InFlight,
    check_context,
    check_input,
    check_usable,
    completion_budget,
    validate_sampling,
)
from tests.helpers.engine import user_request

FINAL = Final(usage=Usage(prompt_tokens=1, completion_tokens=2), finish_reason="stop")


async def test_channel_yields_up_to_final_then_stops() -> None:
    channel = EventChannel()
    for item in (Delta(text="a"), Delta(text="b"), FINAL, Delta(text="after")):
        channel.put(item)
    assert not channel.finished
    events = [event async for event in channel]
    assert events == [Delta(text="a"), Delta(text="b"), FINAL]
    assert channel.finished


async def test_channel_raises_the_producers_exception() -> None:
    channel = EventChannel()
    channel.put(Delta(text="a"))
    channel.put(EngineFault("boom"))
    seen: list[object] = []
    with pytest.raises(EngineFault, match="boom"):
        async for event in channel:
            seen.append(event)
    assert seen == [Delta(text="a")]
    assert channel.finished


async def test_channel_is_not_finished_when_the_consumer_leaves_early() -> None:
    channel = EventChannel()
    channel.put(Delta(text="a"))
    assert await anext(channel) == Delta(text="a")
    assert not channel.finished  # the engine must stop the producer
    waiter = asyncio.create_task(anext(channel))
    await asyncio.sleep(0)
    assert not waiter.done()
    asyncio.get_running_loop().call_soon(channel.put, FINAL)  # as a producer thread would
    assert await waiter == FINAL
    assert channel.finished


def test_in_flight_tracks_every_generation_of_a_request_id() -> None:
    running: InFlight[str] = InFlight()
    a, b = RequestId("a"), RequestId("b")
    running.add(a, "a#0")
    running.add(a, "a#1")
    running.add(b, "b#0")
    assert sorted(running.of(a)) == ["a#0", "a#1"]
    assert running.of(RequestId("unknown")) == []
    assert sorted(running.all()) == ["a#0", "a#1", "b#0"]
    for handle in running.of(a):  # a copy: safe to discard while iterating
        running.discard(a, handle)
    running.discard(a, "a#0")  # twice is harmless
    assert len(running) == 1
    running.discard(b, "b#0")
    assert not running


def test_check_usable() -> None:
    check_usable(ModelId("m"), fault=None, unloaded=False)
    with pytest.raises(EngineFault, match="m is failed: bad gpu"):
        check_usable(ModelId("m"), fault="bad gpu", unloaded=True)
    with pytest.raises(EngineError, match="m is unloaded") as info:
        check_usable(ModelId("m"), fault=None, unloaded=True)
    assert not isinstance(info.value, EngineFault)


def test_check_input_names_the_field_that_carries_the_input() -> None:
    assert check_input(user_request("x")) == "messages"
    assert check_input(GenerationRequest(request_id=RequestId("r"), prompt="x")) == "prompt"
    for bad in (
        GenerationRequest(request_id=RequestId("r")),
        GenerationRequest(request_id=RequestId("r"), prompt="x", messages=user_request("x").messages),
    ):
        with pytest.raises(RequestError) as info:
            check_input(bad)
        assert info.value.param == "messages"


@pytest.mark.parametrize(
    ("sampling", "param"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_validate_sampling_refuses(sampling: dict[str, float], param: str) -> None:
    with pytest.raises(RequestError) as info:
        validate_sampling(SamplingParams(**sampling))  # type: ignore[arg-type]
    assert info.value.param == param


def test_validate_sampling_accepts_the_edges() -> None:
    validate_sampling(SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=1))


@given(
    context_length=st.integers(1, 64),
    n_prompt=st.integers(0, 80),
    max_tokens=st.none() | st.integers(1, 80),
)
def test_context_check_and_budget_agree(context_length: int, n_prompt: int, max_tokens: int | None) -> None:
    """A request passes the check exactly when it leaves room for at least one token and `max_tokens`
    fits; then the budget is `max_tokens`, or the rest of the context."""
    fits = n_prompt < context_length and (max_tokens is None or n_prompt + max_tokens <= context_length)
    try:
        check_context(n_prompt=n_prompt, max_tokens=max_tokens, context_length=context_length, param="prompt")
    except ContextLengthExceeded as exc:
        assert not fits
        assert exc.param == ("prompt" if n_prompt >= context_length else "max_tokens")
        return
    assert fits
    budget = completion_budget(n_prompt=n_prompt, max_tokens=max_tokens, context_length=context_length)
    assert budget == (context_length - n_prompt if max_tokens is None else max_tokens)
    assert 1 <= budget <= context_length - n_prompt
