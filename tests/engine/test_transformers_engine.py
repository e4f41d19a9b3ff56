"""The transformers engine on tiny random-weight models (CPU)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helexa.engine.base import (
    Delta,
    Final,
    GenerationRequest,
    LoadedModel,
    LoadProgress,
    LoadSpec,
    ModelId,
    RequestId,
    SamplingParams,
)
from helexa.engine.errors import (
    ContextLengthExceeded,
    EngineError,
    EngineFault,
    LoadError,
    ModelSourceError,
    RequestError,
    TransientLoadError,
)
from helexa.engine.transformers_engine import TransformersEngine, TransformersModel, _Detokenizer
from tests.helpers.engine import collect, collect_deltas, user_request

from .conftest import load_sync

HELLO = "Hello there, how are you?"


def chat(**sampling: Any) -> GenerationRequest:
    return user_request(HELLO, **sampling)


def hf_greedy(path: Path, request_text: str, max_new_tokens: int) -> tuple[str, int]:
    """Reference: transformers' own `generate`, greedy, on the same weights."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    ids = tokenizer.encode(request_text, add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=2,
            pad_token_id=0,
        )
    new = out[0, len(ids) :].tolist()
    return str(tokenizer.decode(new, skip_special_tokens=True)), len(new)


async def test_protocols_and_memory(tiny_model: TransformersModel) -> None:
    assert isinstance(TransformersEngine(), object)
    assert isinstance(tiny_model, LoadedModel)
    assert tiny_model.memory.total_mb > 0
    assert set(tiny_model.memory.per_device_mb) == {"cpu"}
    assert tiny_model.context_length == 512


async def test_greedy_matches_transformers_generate(
    tiny_model: TransformersModel, tiny_model_dir: Path
) -> None:
    """The hand-written loop produces exactly what `model.generate` produces, and the streamed deltas
    concatenate to the text of all generated ids decoded at once."""
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    rendered = str(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": HELLO}], tokenize=False, add_generation_prompt=True
        )
    )
    expected_text, expected_n = await asyncio.to_thread(hf_greedy, tiny_model_dir, rendered, 40)
    deltas, final = await collect_deltas(tiny_model, chat(temperature=0, max_tokens=40))
    assert "".join(deltas) == expected_text
    assert final.usage.completion_tokens == expected_n
    assert final.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))
    assert len(deltas) > 1


async def test_completion_prompt(tiny_model: TransformersModel) -> None:
    request = GenerationRequest(
        request_id=RequestId("c"),
        prompt="Beautiful is better than",
        sampling=SamplingParams(max_tokens=7, seed=3),
    )
    _, final = await collect(tiny_model, request)
    assert final.usage.prompt_tokens > 0
    assert final.usage.total_tokens == final.usage.prompt_tokens + final.usage.completion_tokens
    assert 1 <= final.usage.completion_tokens <= 7
    if final.finish_reason == "length":
        assert final.usage.completion_tokens == 7


async def test_greedy_is_deterministic(tiny_model: TransformersModel) -> None:
    a = await collect(tiny_model, chat(temperature=0, max_tokens=20))
    b = await collect(tiny_model, chat(temperature=0, max_tokens=20))
    assert a[0] == b[0]


async def test_seed_determinism(tiny_model: TransformersModel) -> None:
    same = [await collect(tiny_model, chat(temperature=1.0, seed=42, max_tokens=12)) for _ in range(2)]
    assert same[0][0] == same[1][0]
    assert same[0][1] == same[1][1]
    others = {(await collect(tiny_model, chat(temperature=1.0, seed=s, max_tokens=12)))[0] for s in (1, 2, 3)}
    assert len(others | {same[0][0]}) >= 3, "different seeds should give different samples"
    unseeded = {(await collect(tiny_model, chat(temperature=1.0, max_tokens=12)))[0] for _ in range(2)}
    assert len(unseeded) == 2, "without a seed, sampling is random"


async def test_top_k_one_is_greedy(tiny_model: TransformersModel) -> None:
    greedy = await collect(tiny_model, chat(temperature=0, max_tokens=20))
    top1 = await collect(tiny_model, chat(temperature=1.5, top_k=1, seed=7, max_tokens=20))
    tiny_p = await collect(tiny_model, chat(temperature=1.5, top_p=1e-6, seed=8, max_tokens=20))
    assert top1[0] == greedy[0] == tiny_p[0]


async def test_max_tokens_gives_length(tiny_model: TransformersModel) -> None:
    _, final = await collect(tiny_model, chat(temperature=0, max_tokens=5))
    assert final.finish_reason == "length"
    assert final.usage.completion_tokens == 5


async def test_stop_string_spanning_deltas_is_trimmed(tiny_model: TransformersModel) -> None:
    deltas, _ = await collect_deltas(tiny_model, chat(temperature=0, max_tokens=40))
    full = "".join(deltas)
    # A stop string made of the end of one delta and the start of the next.
    i = next(i for i in range(2, len(deltas) - 1) if deltas[i] and deltas[i + 1] and deltas[i].strip())
    stop = deltas[i][-1] + deltas[i + 1][:1]
    cut = full.find(stop)
    text, final = await collect(tiny_model, chat(temperature=0, max_tokens=40, stop=[stop]))
    assert final.finish_reason == "stop"
    assert text == full[:cut]
    assert stop not in text
    assert final.usage.completion_tokens < 40


async def test_stop_string_never_in_output(tiny_model: TransformersModel) -> None:
    full, _ = await collect(tiny_model, chat(temperature=0, max_tokens=40))
    stop = "zzz-not-there"
    text, final = await collect(tiny_model, chat(temperature=0, max_tokens=40, stop=(stop, full[5:8])))
    assert text == full[: full.find(full[5:8])]
    assert final.finish_reason == "stop"


async def test_context_overflow_raises_before_any_delta(tiny_model: TransformersModel) -> None:
    long = GenerationRequest(request_id=RequestId("x"), prompt="word " * 2000, sampling=SamplingParams())
    stream = tiny_model.generate(long)
    with pytest.raises(ContextLengthExceeded) as info:
        await anext(stream)
    assert info.value.param == "prompt"
    with pytest.raises(ContextLengthExceeded) as info:
        await collect(tiny_model, chat(max_tokens=600))
    assert info.value.param == "max_tokens"


@pytest.mark.parametrize(
    ("sampling", "param"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
async def test_bad_sampling_is_a_request_error(
    tiny_model: TransformersModel, sampling: dict, param: str
) -> None:
    with pytest.raises(RequestError) as info:
        await collect(tiny_model, chat(**sampling))
    assert info.value.param == param
    await collect(tiny_model, chat(max_tokens=2))  # still healthy


async def test_until_context_full_gives_length(tiny_model_dir: Path) -> None:
    model = await TransformersEngine().load(
        LoadSpec(model_id=ModelId("short"), source=str(tiny_model_dir), context_length=40)
    )
    try:
        assert model.context_length == 40
        _, final = await collect(model, chat(temperature=0))
        assert final.finish_reason == "length"
        assert final.usage.total_tokens == 40
    finally:
        await model.unload()


def count_forwards(model: TransformersModel, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    runtime = model._runtime
    assert runtime is not None
    calls = [0]
    original = runtime.forward

    def counting(*args: Any) -> Any:
        calls[0] += 1
        return original(*args)

    monkeypatch.setattr(runtime, "forward", counting)
    return calls


async def test_aclose_aborts_and_frees_the_model(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = await TransformersEngine().load(LoadSpec(model_id=ModelId("a"), source=str(tiny_model_dir)))
    try:
        calls = count_forwards(model, monkeypatch)
        stream = model.generate(chat(temperature=1.0, seed=1))  # until the context is full (~490 tokens)
        received = 0
        async for event in stream:
            received += isinstance(event, Delta)
            if received == 3:
                break
        await stream.aclose()  # type: ignore[attr-defined]
        _, final = await collect(model, chat(temperature=0, max_tokens=3))
        assert final.usage.completion_tokens == 3
        # The abandoned request stopped long before filling the context.
        assert calls[0] < 200
        assert not model._in_flight
    finally:
        await model.unload()


async def test_cancelling_the_consumer_task_aborts(tiny_model: TransformersModel) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in tiny_model.generate(chat(temperature=1.0, seed=2)):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    _, final = await asyncio.wait_for(collect(tiny_model, chat(max_tokens=2)), timeout=30)
    assert final.usage.completion_tokens == 2


async def test_abort_from_outside_ends_the_stream(tiny_model: TransformersModel) -> None:
    request = user_request(HELLO, rid="victim", seed=5)
    final: Final | None = None
    n = 0
    async for event in tiny_model.generate(request):
        if isinstance(event, Delta):
            n += 1
            if n == 2:
                await tiny_model.abort(RequestId("victim"))
        else:
            final = event
    assert final is not None
    assert final.finish_reason == "stop"
    assert final.usage.completion_tokens < 100


async def test_concurrent_requests_match_running_alone(tiny_model: TransformersModel) -> None:
    requests = [chat(temperature=1.0, seed=s, max_tokens=12) for s in (11, 12, 13)]
    alone = [await collect(tiny_model, r) for r in requests]
    together = await asyncio.gather(*(collect(tiny_model, r) for r in requests))
    assert [t[0] for t in together] == [a[0] for a in alone]
    assert [t[1] for t in together] == [a[1] for a in alone]


async def test_device_fault_poisons_only_this_model(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = await TransformersEngine().load(LoadSpec(model_id=ModelId("f"), source=str(tiny_model_dir)))
    try:
        runtime = model._runtime
        assert runtime is not None
        original = runtime.forward
        calls = [0]

        def faulty(*args: Any) -> Any:
            calls[0] += 1
            if calls[0] == 3:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return original(*args)

        monkeypatch.setattr(runtime, "forward", faulty)
        with pytest.raises(EngineFault):
            await collect(model, chat(temperature=0, max_tokens=10))
        assert model.fault is not None
        with pytest.raises(EngineFault):
            await collect(model, chat(max_tokens=2))
    finally:
        await model.unload()


async def test_other_errors_are_not_faults(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = await TransformersEngine().load(LoadSpec(model_id=ModelId("g"), source=str(tiny_model_dir)))
    try:
        runtime = model._runtime
        assert runtime is not None
        original = runtime.forward
        calls = [0]

        def broken_once(*args: Any) -> Any:
            calls[0] += 1
            if calls[0] == 2:
                raise ValueError("shape mismatch")
            return original(*args)

        monkeypatch.setattr(runtime, "forward", broken_once)
        with pytest.raises(EngineError) as info:
            await collect(model, chat(temperature=0, max_tokens=10))
        assert not isinstance(info.value, EngineFault)
        assert model.fault is None
        _, final = await collect(model, chat(max_tokens=3))
        assert final.usage.completion_tokens == 3
    finally:
        await model.unload()


async def test_unload_is_idempotent_and_fails_inflight(tiny_model_dir: Path) -> None:
    model = await TransformersEngine().load(LoadSpec(model_id=ModelId("u"), source=str(tiny_model_dir)))
    stream = model.generate(chat(temperature=1.0, seed=3))
    assert isinstance(await anext(stream), Delta)
    await model.unload()
    with pytest.raises(EngineError):
        async for _ in stream:
            pass
    await model.unload()
    with pytest.raises(EngineError):
        await collect(model, chat(max_tokens=1))
    assert model._runtime is None
    assert not model._thread.is_alive()


async def test_qwen2_with_padded_vocab(tiny_qwen_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ids past the tokenizer's vocabulary are never sampled (the embedding has 1024 rows, the
    tokenizer 512 entries); the chat template comes from the tokenizer."""
    model = await TransformersEngine().load(LoadSpec(model_id=ModelId("q"), source=str(tiny_qwen_dir)))
    try:
        runtime = model._runtime
        assert runtime is not None
        assert runtime.vocab_limit == 512
        sampled: list[int] = []
        original = runtime.sample

        def recording(*args: Any) -> list[int]:
            tokens = original(*args)
            sampled.extend(tokens)
            return tokens

        monkeypatch.setattr(runtime, "sample", recording)
        _, final = await collect(model, chat(temperature=2.0, seed=9, max_tokens=60))
        assert len(sampled) == final.usage.completion_tokens
        assert max(sampled) < 512
    finally:
        await model.unload()


async def test_load_reports_progress_in_order(tiny_model_dir: Path) -> None:
    seen: list[LoadProgress] = []
    model = await TransformersEngine().load(
        LoadSpec(model_id=ModelId("p"), source=str(tiny_model_dir)), progress=seen.append
    )
    await asyncio.sleep(0)  # progress is delivered through the loop
    await model.unload()
    phases = [p.phase for p in seen]
    assert phases == ["resolving", "loading", "warming"]


@pytest.mark.parametrize(
    ("source", "devices", "error"),
    [
        ("/nonexistent/model", ("cpu",), ModelSourceError),
        ("HF://mlc-ai/Qwen2.5-0.5B-Instruct-q4f16_1-MLC", ("cpu",), ModelSourceError),
        ("not a repo", ("cpu",), ModelSourceError),
        ("TINY", ("cuda:0",), LoadError),
        ("TINY", ("cpu", "cpu"), LoadError),
        ("TINY", ("tpu",), LoadError),
    ],
)
async def test_load_errors(tiny_model_dir: Path, source: str, devices: tuple[str, ...], error: type) -> None:
    spec = LoadSpec(
        model_id=ModelId("bad"), source=str(tiny_model_dir) if source == "TINY" else source, devices=devices
    )
    with pytest.raises(error):
        await TransformersEngine().load(spec)


async def test_directory_without_config_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"config\.json"):
        await TransformersEngine().load(LoadSpec(model_id=ModelId("e"), source=str(tmp_path)))


def test_detokenizer_never_splits_multibyte_characters(tiny_model: TransformersModel) -> None:
    runtime = tiny_model._runtime
    assert runtime is not None
    text = "Héllo wörld 日本語 🎉🚀 ✨ done"
    ids = runtime.raw_tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text.split()) + 5  # the multi-byte characters really are split across tokens
    detok = _Detokenizer(runtime.raw_tokenizer)
    chunks = [detok.step(i) for i in ids]
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) + detok.flush() == text


def test_importing_engines_does_not_import_torch() -> None:
    code = (
        "import sys, helexa.engine, helexa.engine.transformers_engine, helexa.engine.fake, "
        "helexa.engine.registry, helexa.engine.mlc_engine, helexa.engine.testing\n"
        "heavy = [m for m in ('torch', 'transformers', 'tokenizers', 'mlc_llm') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_second_load_is_independent(tiny_model_dir: Path, tiny_model: TransformersModel) -> None:
    other = load_sync(tiny_model_dir)
    try:
        assert other is not tiny_model
        assert other.memory.total_mb > 0
    finally:
        asyncio.run(other.unload())


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.usefixtures("hub_offline")
async def test_repo_id_loads_from_the_hf_cache(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A repo id resolves through `snapshot_download` into the HF cache (here pre-populated, offline)."""
    snapshot = tmp_path / "models--helexa--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_model_dir, snapshot)
    (tmp_path / "models--helexa--tiny" / "refs").mkdir()
    (tmp_path / "models--helexa--tiny" / "refs" / "main").write_text("0123abcd")
    seen: list[LoadProgress] = []
    model = await TransformersEngine().load(
        LoadSpec(model_id=ModelId("helexa/tiny"), source="helexa/tiny", cache_dir=tmp_path),
        progress=seen.append,
    )
    try:
        _, final = await collect(model, chat(max_tokens=2))
        assert final.usage.completion_tokens == 2
        assert [p.phase for p in seen][:2] == ["resolving", "downloading"]
    finally:
        await model.unload()


@pytest.mark.usefixtures("hub_offline")
async def test_unreachable_hub_is_a_transient_load_error(tmp_path: Path) -> None:
    with pytest.raises(TransientLoadError):
        await TransformersEngine().load(
            LoadSpec(model_id=ModelId("q"), source="Qwen/Qwen2.5-0.5B-Instruct", cache_dir=tmp_path)
        )
