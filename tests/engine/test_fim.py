"""Fill in the middle (`suffix` on completions): the tokenizer's own FIM tokens around prefix and suffix;
a model without them refuses `suffix`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from helexa.catalogue.validate import builtin_path
from helexa.engine.base import GenerationRequest, LoadSpec, ModelId, RequestId, SamplingParams
from helexa.engine.errors import RequestError
from helexa.engine.testing import build_tiny_model
from helexa.engine.transformers_engine import TransformersEngine
from tests.helpers.engine import collect

FIM = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]


def _request(suffix: str) -> GenerationRequest:
    return GenerationRequest(
        request_id=RequestId("fim"),
        prompt="def add(a, b):\n    ",
        suffix=suffix,
        sampling=SamplingParams(temperature=0.0, max_tokens=4),
    )


async def test_fill_in_the_middle_with_the_tokenizers_fim_tokens(tmp_path: Path) -> None:
    path = build_tiny_model(tmp_path / "fim", padded_vocab_size=1024, seed=2)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", *FIM]})
    tokenizer.save_pretrained(str(path))
    model = await TransformersEngine().load(LoadSpec(model_id=ModelId("fim"), source=str(path)))
    try:
        ids = await asyncio.to_thread(model._prepare, _request("\n    return result\n"))
        vocab = tokenizer.get_vocab()
        pre, suf, mid = (vocab[name] for name in FIM)
        assert ids[0] == pre and suf in ids and ids[-1] == mid
        assert tokenizer.decode(ids[1 : ids.index(suf)]) == "def add(a, b):\n    "
        _, final = await collect(model, _request("\n    return result\n"))
        assert final.usage.prompt_tokens == len(ids) and final.usage.completion_tokens > 0
    finally:
        await model.unload()


async def test_a_model_without_fim_tokens_refuses_suffix() -> None:
    model = await TransformersEngine().load(
        LoadSpec(model_id=ModelId("demo"), source=str(builtin_path("demo")))
    )
    try:
        with pytest.raises(RequestError) as info:
            await collect(model, _request("x"))
        assert info.value.param == "suffix"
    finally:
        await model.unload()
