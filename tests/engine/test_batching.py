"""Batched decoding in the transformers engine: requests to one model decode together, and the
per-request sampling pipeline acts per sequence inside the batch."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch

from helexa.engine.base import (
    ChatMessage,
    Delta,
    Final,
    GenerationRequest,
    LoadSpec,
    ModelId,
    RequestId,
    SamplingParams,
    TokenLogprob,
)
from helexa.engine.errors import ContextLengthExceeded, RequestError
from helexa.engine.transformers_engine import TransformersEngine, TransformersModel
from tests.helpers.engine import collect, user_request
from tests.helpers.polling import eventually

PROMPTS = [
    "Hello there, how are you?",
    "Tell me about functions.",
    "A much longer question about the way the weather changes over the seasons in the north",
    "Why?",
    "List three colours and say which one you like most and why you like it",
    "ok",
]


@pytest.fixture
async def model(tiny_model_dir: Path) -> AsyncIterator[TransformersModel]:
    loaded = await TransformersEngine().load(LoadSpec(model_id=ModelId("b"), source=str(tiny_model_dir)))
    yield loaded
    await loaded.unload()


def _requests(**sampling: object) -> list[GenerationRequest]:
    return [user_request(p, rid=f"r{i}", **sampling) for i, p in enumerate(PROMPTS)]


async def _alone(model: TransformersModel, requests: list[GenerationRequest]) -> list[tuple[str, int]]:
    out = []
    for r in requests:
        text, final = await collect(model, r)
        out.append((text, final.usage.completion_tokens))
    return out


async def _together(model: TransformersModel, requests: list[GenerationRequest]) -> list[tuple[str, int]]:
    results = await asyncio.gather(*(collect(model, r) for r in requests))
    return [(text, final.usage.completion_tokens) for text, final in results]


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 1.0, "seed": 7}])
async def test_batched_outputs_equal_unbatched(model: TransformersModel, sampling: dict[str, object]) -> None:
    requests = _requests(max_tokens=24, **sampling)
    alone = await _alone(model, requests)
    assert model.peak_batch == 1
    together = await _together(model, requests)
    assert model.peak_batch > 1  # they really ran together
    assert together == alone
    # Arriving while the model is busy (a slower model), the waiting prompts are prefilled in one forward:
    # the same outputs again.
    runtime = model._runtime
    assert runtime is not None
    original = runtime.forward

    def slow(*args: object) -> object:
        time.sleep(0.02)
        return original(*args)  # type: ignore[arg-type]

    runtime.forward = slow  # type: ignore[method-assign,assignment]
    model.prefix_reuse = False  # no reuse of the runs above
    grouped = await _together(
        model, [user_request("Busy?", rid="first", **sampling), *_requests(max_tokens=24, **sampling)]
    )
    assert model.peak_prefill_group > 1
    assert grouped[1:] == alone


async def test_joining_and_leaving_mid_batch_changes_nothing(model: TransformersModel) -> None:
    long = user_request(PROMPTS[0], rid="long", temperature=0.0, max_tokens=60)
    ((expected, _),) = [await collect(model, long)]
    shorts = [
        user_request(p, rid=f"s{i}", temperature=0.0, max_tokens=3 + i) for i, p in enumerate(PROMPTS[1:])
    ]
    shorts_alone = await _alone(model, shorts)

    async def staggered() -> list[tuple[str, int]]:
        out = []
        for r in shorts:  # each joins while the long one runs, and leaves before it ends
            await asyncio.sleep(0.01)
            text, final = await collect(model, r)
            out.append((text, final.usage.completion_tokens))
        return out

    (text, final), shorts_together = await asyncio.gather(collect(model, long), staggered())
    assert text == expected and final.usage.completion_tokens == 60
    assert shorts_together == shorts_alone
    assert model.peak_batch >= 2


async def test_cancelling_mid_prefill_frees_the_slot_at_once(model: TransformersModel) -> None:
    model.prefill_chunk_tokens = 4
    runtime = model._runtime
    assert runtime is not None
    forwards = [0]
    original = runtime.forward

    def counting(*args: object) -> object:
        forwards[0] += 1
        time.sleep(0.01)  # a prefill chunk that takes a while
        return original(*args)  # type: ignore[arg-type]

    runtime.forward = counting  # type: ignore[method-assign,assignment]
    long_prompt = " ".join(["word"] * 120)  # ~90 chunks of 4 tokens
    stream = model.generate(user_request(long_prompt, rid="victim", temperature=0.0, max_tokens=5))
    task = asyncio.ensure_future(anext(stream))
    await eventually(lambda: forwards[0] >= 3, timeout_s=10.0, interval_s=0.005, what="prefill chunks")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await stream.aclose()  # type: ignore[attr-defined]
    started = time.monotonic()
    _, final = await collect(model, user_request("hi", rid="next", temperature=0.0, max_tokens=2))
    assert final.usage.completion_tokens == 2
    assert time.monotonic() - started < 2.0
    assert forwards[0] < 40  # the victim's prefill stopped long before its ~90 chunks


async def test_kv_budget_bounds_the_batch_and_queues_the_rest(model: TransformersModel) -> None:
    requests = [
        user_request(PROMPTS[i % len(PROMPTS)], rid=f"q{i}", temperature=0.0, max_tokens=4) for i in range(64)
    ]
    longest = max(len(model._prepare(r)) + 4 for r in requests)
    shortest = min(len(model._prepare(r)) + 4 for r in requests)
    model.kv_budget_tokens = 3 * longest
    results = await _together(model, requests)
    assert all(n == 4 for _, n in results)
    assert model.peak_batch > 1 and model.peak_batch * shortest <= model.kv_budget_tokens
    assert model.peak_kv_tokens <= model.kv_budget_tokens


async def test_logit_bias_forces_and_bans_tokens(model: TransformersModel) -> None:
    runtime = model._runtime
    assert runtime is not None
    plain = await _token_ids(model, user_request(PROMPTS[1], temperature=0.0, max_tokens=6))
    forced = plain[0] + 1
    assert (
        await _token_ids(
            model, user_request(PROMPTS[1], temperature=0.0, max_tokens=6, logit_bias=((forced, 100.0),))
        )
        == [forced] * 6
    )
    banned = await _token_ids(
        model, user_request(PROMPTS[1], temperature=0.0, max_tokens=6, logit_bias=((plain[0], -100.0),))
    )
    assert plain[0] not in banned


async def test_penalties_act(model: TransformersModel) -> None:
    plain = await _token_ids(model, user_request(PROMPTS[0], temperature=0.0, max_tokens=40))
    assert len(set(plain)) < len(plain)  # random weights repeat themselves under greedy decoding
    penalties: list[dict[str, Any]] = [
        {"frequency_penalty": 2.0},
        {"presence_penalty": 2.0},
        {"repetition_penalty": 10.0},
    ]
    for penalty in penalties:
        penalised = await _token_ids(
            model, user_request(PROMPTS[0], temperature=0.0, max_tokens=40, **penalty)
        )
        assert len(set(penalised)) > len(set(plain)), penalty


async def test_min_p_and_top_k_of_one_are_greedy(model: TransformersModel) -> None:
    greedy = await _token_ids(model, user_request(PROMPTS[2], temperature=0.0, max_tokens=12))
    for cut in ({"min_p": 1.0}, {"top_k": 1}):
        sampled = await _token_ids(
            model, user_request(PROMPTS[2], temperature=1.5, seed=3, max_tokens=12, **cut)
        )
        assert sampled == greedy, cut


async def test_a_tiny_temperature_is_greedy_not_an_error(model: TransformersModel) -> None:
    greedy = await _token_ids(model, user_request(PROMPTS[3], temperature=0.0, max_tokens=8))
    for temperature in (1e-38, 1e-30, 1e-6):
        assert (
            await _token_ids(model, user_request(PROMPTS[3], temperature=temperature, max_tokens=8)) == greedy
        )


async def test_stop_token_ids_end_and_ignore_eos_goes_on(model: TransformersModel) -> None:
    plain = await _token_ids(model, user_request(PROMPTS[1], temperature=0.0, max_tokens=8))
    _, final = await collect(
        model, user_request(PROMPTS[1], temperature=0.0, max_tokens=8, stop_token_ids=(plain[2],))
    )
    assert final.finish_reason == "stop" and final.usage.completion_tokens == 3
    runtime = model._runtime
    assert runtime is not None
    eos = min(runtime.eos_ids)
    _, final = await collect(
        model,
        user_request(PROMPTS[1], temperature=0.0, max_tokens=8, logit_bias=((eos, 100.0),), ignore_eos=True),
    )
    assert final.finish_reason == "length" and final.usage.completion_tokens == 8


async def test_an_oversized_prompt_is_refused_before_tokenizing(model: TransformersModel) -> None:
    huge = "x" * 15_000_000
    started = time.monotonic()
    with pytest.raises(ContextLengthExceeded) as info:
        await collect(
            model, GenerationRequest(request_id=RequestId("huge"), prompt=huge, sampling=SamplingParams())
        )
    assert time.monotonic() - started < 1.0
    assert info.value.param == "prompt"


async def _token_ids(model: TransformersModel, request: GenerationRequest) -> list[int]:
    """The completion's token ids (recorded at the sampler)."""
    runtime = model._runtime
    assert runtime is not None
    chosen: list[int] = []
    original = runtime.sample

    def recording(logits: object, rows: list[object]) -> list[int]:
        tokens = original(logits, rows)
        chosen.extend(tokens)
        return tokens

    runtime.sample = recording  # type: ignore[method-assign]
    try:
        async for event in model.generate(request):
            assert not isinstance(event, Delta) or event.text
    finally:
        runtime.sample = original  # type: ignore[method-assign]
    return chosen


async def test_a_next_chat_turn_reuses_the_conversation_so_far(model: TransformersModel) -> None:
    def turn(*texts: str) -> GenerationRequest:
        roles = ["user", "assistant"]
        messages = tuple(ChatMessage(role=roles[i % 2], content=t) for i, t in enumerate(texts))  # type: ignore[arg-type]
        return GenerationRequest(
            request_id=RequestId("t"),
            messages=messages,
            sampling=SamplingParams(temperature=0.0, max_tokens=12),
        )

    async def conversation() -> tuple[str, str]:
        first, _ = await collect(model, turn(PROMPTS[2]))
        second, _ = await collect(model, turn(PROMPTS[2], first, "And then?"))
        return first, second

    model.prefix_reuse = False  # no reuse of the runs above
    expected = await conversation()
    assert model._prefix.hits == 0
    model.prefix_reuse = True
    assert await conversation() == expected
    assert model._prefix.hits >= 1 and model._prefix.reused_tokens >= len(PROMPTS[2].split())


async def test_the_same_prompt_again_needs_no_prefill(model: TransformersModel) -> None:
    runtime = model._runtime
    assert runtime is not None
    first = user_request(PROMPTS[4], rid="a", temperature=1.0, seed=1, max_tokens=5)
    await collect(model, first)
    forwards = [0]
    original = runtime.forward

    def counting(*args: object) -> object:
        forwards[0] += 1
        return original(*args)  # type: ignore[arg-type]

    runtime.forward = counting  # type: ignore[method-assign,assignment]
    _, final = await collect(model, user_request(PROMPTS[4], rid="b", temperature=1.0, seed=2, max_tokens=5))
    assert final.usage.completion_tokens == 5
    assert forwards[0] == 4  # decode steps only: the prompt's KV and first logits were reused


async def _logprob_run(
    model: TransformersModel, request: GenerationRequest
) -> tuple[list[TokenLogprob], Final]:
    """The generated tokens' logprob entries in order (deltas then Final) and the Final."""
    entries: list[TokenLogprob] = []
    final: Final | None = None
    async for event in model.generate(request):
        if isinstance(event, Delta):
            entries += event.logprobs
        else:
            final = event
            entries += event.logprobs
    assert final is not None
    return entries, final


def _reference_logprobs(model: TransformersModel, ids: list[int]) -> torch.Tensor:
    """log_softmax of a plain forward pass over `ids`: row j scores token j + 1."""
    runtime = model._runtime
    assert runtime is not None
    with torch.inference_mode():
        logits = runtime.model(input_ids=torch.tensor([ids])).logits[0, :, : runtime.vocab_limit]
    return torch.log_softmax(logits.float(), dim=-1)


async def test_logprobs_match_a_direct_forward_pass_also_batched(model: TransformersModel) -> None:
    requests = [
        GenerationRequest(
            request_id=RequestId(f"l{i}"),
            prompt=p,
            sampling=SamplingParams(temperature=0.0, max_tokens=6),
            logprobs=3,
        )
        for i, p in enumerate(PROMPTS[:4])
    ]
    results = await asyncio.gather(*(_logprob_run(model, r) for r in requests))
    assert model.peak_batch > 1
    for request, (entries, final) in zip(requests, results, strict=True):
        prompt = model._prepare(request)
        generated = [e.token_id for e in entries]
        assert len(generated) == final.usage.completion_tokens
        reference = _reference_logprobs(model, prompt + generated)
        for j, entry in enumerate(entries):
            row = reference[len(prompt) - 1 + j]
            assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-3)
            assert len(entry.top) == 3
            assert entry.top[0][0] == entry.token_id  # greedy: the chosen token is the most likely
            assert [t for t, _, _ in entry.top] == row.topk(3).indices.tolist()


async def test_prompt_logprobs_and_token_id_prompts(model: TransformersModel) -> None:
    prompt = model._prepare(user_request(PROMPTS[2]))
    request = GenerationRequest(
        request_id=RequestId("echo"),
        prompt_ids=tuple(prompt),
        sampling=SamplingParams(temperature=0.0, max_tokens=1),
        logprobs=1,
        prompt_logprobs=True,
    )
    model.prefill_chunk_tokens = 7  # across several chunks
    _, final = await _logprob_run(model, request)
    assert final.usage.prompt_tokens == len(prompt)
    reference = _reference_logprobs(model, prompt)
    assert [e.token_id for e in final.prompt_logprobs] == prompt
    assert math.isnan(final.prompt_logprobs[0].logprob)
    for j, entry in enumerate(final.prompt_logprobs[1:]):
        assert entry.logprob == pytest.approx(float(reference[j][prompt[j + 1]]), abs=1e-3)
    with pytest.raises(RequestError):
        await collect(model, GenerationRequest(request_id=RequestId("bad"), prompt_ids=(10**7,)))
