"""The fake engine, engine selection, and the stop-string matcher."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from helexa.engine.base import (
    Delta,
    Engine,
    LoadedModel,
    LoadSpec,
    ModelId,
    RequestId,
)
from helexa.engine.errors import ContextLengthExceeded, EngineFault, ModelSourceError, TransientLoadError
from helexa.engine.fake import FakeEngine, FakeScript
from helexa.engine.registry import choose_engine, create_engine, is_mlc_source
from helexa.engine.textstream import StopStringMatcher
from tests.helpers.engine import collect, user_request


def spec(**options: object) -> LoadSpec:
    return LoadSpec(model_id=ModelId("fake"), source="fake", options=dict(options))


async def test_fake_engine_basics() -> None:
    engine = FakeEngine()
    assert isinstance(engine, Engine)
    model = await engine.load(spec(memory_mb=321))
    assert isinstance(model, LoadedModel)
    assert model.memory.total_mb == 321
    assert engine.loads[ModelId("fake")] == 1
    text, final = await collect(model, user_request())
    assert (text, final.finish_reason) == ("Hello, world!", "stop")
    text, final = await collect(model, user_request(max_tokens=2))
    assert (text, final.finish_reason, final.usage.completion_tokens) == ("Hello,", "length", 2)
    text, final = await collect(model, user_request(stop=["lo,"]))
    assert (text, final.finish_reason) == ("Hel", "stop")
    with pytest.raises(ContextLengthExceeded):
        await collect(model, user_request("w " * 5000))
    await model.unload()
    await model.unload()
    assert engine.unloads[ModelId("fake")] == 1


async def test_fake_echo_delay_and_abort() -> None:
    engine = FakeEngine(FakeScript(echo=True, token_delay_s=0.001))
    model = await engine.load(spec())
    text, _ = await collect(model, user_request("the quick brown fox"))
    assert text == "the quick brown fox"
    seen = 0
    final = None
    async for event in model.generate(user_request("a b c d e f g h", rid="x")):
        if isinstance(event, Delta):
            seen += 1
            await model.abort(RequestId("x"))
        else:
            final = event
    assert seen == 1 and final is not None and final.usage.completion_tokens == 1
    stream = model.generate(user_request("a b c d e f"))
    await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    assert model.requests_cancelled == 1 and model.in_flight == 0


async def test_fake_failures() -> None:
    engine = FakeEngine()
    with pytest.raises(TransientLoadError):
        await engine.load(spec(fail_load="net down", fail_load_kind="transient", fail_load_times=1))
    model = await engine.load(spec(fail_load="net down", fail_load_kind="transient", fail_load_times=1))
    assert engine.load_attempts[ModelId("fake")] == 2 and engine.loads[ModelId("fake")] == 1
    with pytest.raises(ModelSourceError):
        await engine.load(spec(bogus=1))
    broken = await engine.load(spec(fail_after_tokens=2))
    with pytest.raises(EngineFault):
        await collect(broken, user_request())
    with pytest.raises(EngineFault):
        await collect(broken, user_request())
    await collect(model, user_request())


async def test_fake_load_delay_does_not_block_the_loop() -> None:
    engine = FakeEngine(FakeScript(load_delay_s=0.2))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    await asyncio.gather(*(engine.load(spec()) for _ in range(3)))
    task.cancel()
    assert ticks >= 5
    assert engine.loads[ModelId("fake")] == 3  # the engine itself does not deduplicate; the manager must


def test_create_engine_names() -> None:
    assert create_engine("fake").name == "fake"
    assert create_engine("transformers").name == "transformers"
    assert create_engine("mlc").name == "mlc"
    with pytest.raises(ValueError, match="unknown engine"):
        create_engine("nope")  # type: ignore[arg-type]


def test_choose_engine(tmp_path: Path) -> None:
    (tmp_path / "mlc-chat-config.json").write_text("{}")
    mlc_dir = str(tmp_path)
    assert is_mlc_source("HF://mlc-ai/x") and is_mlc_source(mlc_dir) and not is_mlc_source("Qwen/Qwen2.5-7B")
    assert choose_engine("auto", "HF://mlc-ai/x", True, mlc_importable=True) == "mlc"
    assert choose_engine("auto", mlc_dir, True, mlc_importable=True) == "mlc"
    assert choose_engine("auto", "HF://mlc-ai/x", False, mlc_importable=True) == "transformers"
    assert choose_engine("auto", "HF://mlc-ai/x", True, mlc_importable=False) == "transformers"
    assert choose_engine("auto", "Qwen/Qwen2.5-7B", True, mlc_importable=True) == "transformers"
    assert choose_engine("auto", "HF://mlc-ai/x", True) == "transformers"  # mlc_llm is not installed here
    assert choose_engine("fake", "x", False) == "fake"
    assert choose_engine("mlc", "x", False) == "mlc"
    with pytest.raises(ValueError, match="unknown engine"):
        choose_engine("vllm", "x", True)


def reference_cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """Where the stream must end: at the stop string that completes first (ties: starts first)."""
    for end in range(1, len(text) + 1):
        hits = [end - len(s) for s in stops if s and text.endswith(s, 0, end)]
        if hits:
            return text[: min(hits)], True
    return text, False


alphabet = st.sampled_from("ab c")


@given(
    text=st.text(alphabet, max_size=30),
    stops=st.lists(st.text(alphabet, min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=8),
)
def test_stop_matcher_is_chunking_independent_and_never_leaks(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    chunks = [text[a:b] for a, b in itertools.pairwise(bounds)]
    matcher = StopStringMatcher(stops)
    emitted = ""
    stopped = False
    for chunk in chunks:
        out, stopped = matcher.feed(chunk)
        emitted += out
        expected, _ = reference_cut(text, stops)
        assert expected.startswith(emitted), "emitted text is always a prefix of the final answer"
        if stopped:
            break
    if not stopped:
        emitted += matcher.flush()
    expected, expect_stop = reference_cut(text, stops)
    assert emitted == expected
    assert stopped == expect_stop
