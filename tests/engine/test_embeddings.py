"""The transformers embedding engine on a tiny random-weight BERT-like encoder with a sentence-transformers
pooling config: vector shapes, normalisation, batching equals one by one, token-id input, `dimensions`,
the input bounds and the refusals."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from helexa.engine.base import EmbeddingModel, GenerationRequest, LoadSpec, ModelId, RequestId
from helexa.engine.embeddings import EmbeddingEngine, Pooling, TransformersEmbeddingModel, read_pooling
from helexa.engine.errors import ContextLengthExceeded, ModelSourceError, RequestError
from helexa.engine.registry import create_engine
from helexa.engine.testing import build_tiny_encoder
from helexa.engine.transformers_engine import TransformersEngine

TEXTS = ("Hello world", "The quick brown fox jumps over the lazy dog.", "Readability counts.")


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_encoder(
        tmp_path_factory.mktemp("encoder"), context_length=64, matryoshka_dimensions=(8, 16)
    )


@pytest.fixture
async def encoder(encoder_dir: Path) -> AsyncIterator[TransformersEmbeddingModel]:
    model = await EmbeddingEngine().load(
        LoadSpec(model_id=ModelId("enc"), source=str(encoder_dir), task="embed")
    )
    yield model
    await model.unload()


def _norm(v: tuple[float, ...]) -> float:
    return math.sqrt(sum(x * x for x in v))


def _close(a: tuple[float, ...], b: tuple[float, ...], tol: float = 1e-5) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b, strict=True)) < tol


async def test_vectors_are_normalised_and_batching_equals_one_by_one(
    encoder: TransformersEmbeddingModel,
) -> None:
    assert isinstance(encoder, EmbeddingModel)
    assert encoder.pooling == Pooling(mode="mean", normalize=True) and encoder.dimensions == 32
    assert encoder.memory.total_mb > 0 and encoder.context_length == 64
    batch = await encoder.embed(TEXTS)
    assert len(batch.vectors) == 3 and all(len(v) == 32 for v in batch.vectors)
    assert all(abs(_norm(v) - 1.0) < 1e-5 for v in batch.vectors)
    assert not _close(batch.vectors[0], batch.vectors[1])
    singles = [await encoder.embed((t,)) for t in TEXTS]
    for one, vector in zip(singles, batch.vectors, strict=True):
        assert _close(one.vectors[0], vector)
    assert batch.prompt_tokens == sum(s.prompt_tokens for s in singles)


async def test_token_ids_embed_like_their_text(encoder: TransformersEmbeddingModel) -> None:
    text = await encoder.embed((TEXTS[1],))
    ids = tuple(encoder._tokenizer.encode(TEXTS[1], add_special_tokens=False))
    by_ids = await encoder.embed((ids,))
    assert (
        _close(text.vectors[0], by_ids.vectors[0])
        and text.prompt_tokens == by_ids.prompt_tokens == len(ids) + 2
    )


async def test_dimensions_truncate_and_renormalise(encoder: TransformersEmbeddingModel) -> None:
    full = (await encoder.embed((TEXTS[0],))).vectors[0]
    short = (await encoder.embed((TEXTS[0],), dimensions=8)).vectors[0]
    assert len(short) == 8 and abs(_norm(short) - 1.0) < 1e-5
    head = full[:8]
    assert _close(short, tuple(x / _norm(head) for x in head))
    with pytest.raises(RequestError) as info:
        await encoder.embed((TEXTS[0],), dimensions=33)
    assert info.value.param == "dimensions"


async def test_input_bounds_and_refusals(encoder: TransformersEmbeddingModel) -> None:
    with pytest.raises(ContextLengthExceeded) as too_long:
        await encoder.embed(("word " * 200,))
    assert too_long.value.param == "input"
    with pytest.raises(RequestError) as bad_id:
        await encoder.embed(((1, 10**6),))
    assert bad_id.value.param == "input"
    with pytest.raises(RequestError) as chat:
        async for _ in encoder.generate(GenerationRequest(request_id=RequestId("r"), prompt="hi")):
            pass
    assert chat.value.param == "model"


async def test_a_model_without_matryoshka_refuses_dimensions_and_cls_pooling(tmp_path: Path) -> None:
    path = build_tiny_encoder(tmp_path / "cls", pooling="cls", normalize=False)
    assert read_pooling(path) == Pooling(mode="cls", normalize=False)
    model = await EmbeddingEngine().load(LoadSpec(model_id=ModelId("c"), source=str(path), task="embed"))
    try:
        with pytest.raises(RequestError) as info:
            await model.embed(("hi",), dimensions=8)
        assert info.value.param == "dimensions"
        assert len((await model.embed(("hi",), dimensions=32)).vectors[0]) == 32  # its own size is fine
    finally:
        await model.unload()


async def test_engine_choice_and_bad_configs(tmp_path: Path, encoder_dir: Path) -> None:
    assert isinstance(create_engine("transformers", "embed"), EmbeddingEngine)
    assert isinstance(create_engine("transformers"), TransformersEngine)
    with pytest.raises(ModelSourceError):
        await TransformersEngine().load(
            LoadSpec(model_id=ModelId("e"), source=str(encoder_dir), task="embed")
        )
    (tmp_path / "modules.json").write_text('[{"type": "sentence_transformers.models.Dense", "path": "2"}]')
    with pytest.raises(ModelSourceError):
        read_pooling(tmp_path)
    (tmp_path / "modules.json").unlink()
    assert read_pooling(tmp_path) == Pooling()  # no config: mean pooling, normalised
