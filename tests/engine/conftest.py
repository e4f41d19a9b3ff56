"""Fixtures for engine tests: tiny random-weight models built once per session, with no network."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from helexa.engine.base import LoadSpec, ModelId
from helexa.engine.testing import build_tiny_model
from helexa.engine.transformers_engine import TransformersEngine, TransformersModel


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A padded embedding (more rows than tokenizer entries), like real Qwen checkpoints.
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny-qwen"), arch="qwen2", padded_vocab_size=1024, seed=1
    )


def load_sync(path: Path, **spec_kwargs: object) -> TransformersModel:
    """Load outside any running loop; a loaded model is not bound to the loop that loaded it."""
    spec = LoadSpec(model_id=ModelId("tiny"), source=str(path), **spec_kwargs)  # type: ignore[arg-type]
    return asyncio.run(TransformersEngine().load(spec))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> Iterator[TransformersModel]:
    """One shared loaded model for tests that do not change its state."""
    model = load_sync(tiny_model_dir)
    yield model
    asyncio.run(model.unload())
