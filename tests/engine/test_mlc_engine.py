"""The MLC engine's worker supervision and protocol, with a fake worker process (no mlc_llm here)."""

from __future__ import annotations

import asyncio
import os

import pytest

from helexa.engine.base import (
    Delta,
    LoadedModel,
    LoadSpec,
    ModelId,
    RequestId,
)
from helexa.engine.errors import ContextLengthExceeded, EngineError, EngineFault, LoadError, ModelSourceError
from helexa.engine.mlc_engine import MLCEngine, MLCModel, WorkerRequestError, _MLCBackend
from helexa.engine.registry import mlc_available
from tests.helpers.engine import collect, user_request

FAKE_WORKER = "tests.engine.fake_mlc_worker"


async def load_fake(devices: tuple[str, ...] = ("cuda:0",), source: str = "HF://org/model") -> MLCModel:
    engine = MLCEngine(worker_module=FAKE_WORKER, require_mlc=False)
    return await engine.load(LoadSpec(model_id=ModelId("m"), source=source, devices=devices))


async def test_missing_mlc_llm_is_a_clear_load_error() -> None:
    assert not mlc_available(), "this test documents a host without mlc_llm"
    with pytest.raises(LoadError, match="mlc_llm"):
        await MLCEngine().load(LoadSpec(model_id=ModelId("m"), source="HF://x/y", devices=("cuda:0",)))


async def test_cpu_device_is_accepted_other_devices_are_refused() -> None:
    engine = MLCEngine(worker_module=FAKE_WORKER, require_mlc=False)
    model = await engine.load(LoadSpec(model_id=ModelId("m"), source="HF://x/y", devices=("cpu",)))
    try:
        assert model.memory.per_device_mb == {"cpu": 50}
        text, _ = await collect(model, user_request("on the cpu"))
        assert text == "on the cpu"
    finally:
        await model.unload()
    for devices in (("mps",), ("cpu", "cuda:0"), ()):
        with pytest.raises(LoadError, match="cuda"):
            await engine.load(LoadSpec(model_id=ModelId("m"), source="HF://x/y", devices=devices))


class _BadRequestError(Exception):
    """Stands in for mlc_llm's BadRequestError (the backend matches it by name)."""


_BadRequestError.__name__ = "BadRequestError"


class _FakeMLC:
    """An `AsyncMLCEngine` stand-in whose stream fails the way MLC's does for a prompt over the context:
    not when the stream is created, but while it is iterated."""

    def __init__(self) -> None:
        self.requests: list[dict[str, object]] = []
        self.chat = self
        self.completions = self

    async def create(self, **kwargs: object) -> object:
        self.requests.append(kwargs)

        async def stream() -> object:
            raise _BadRequestError("Request prompt length 9000 exceeds the max input sequence length")
            yield  # an async generator

        return stream()


async def test_mlc_bad_request_while_streaming_is_a_context_error() -> None:
    backend = _MLCBackend()
    fake = _FakeMLC()
    backend._engine = fake
    sampling = {
        "temperature": 0.5,
        "top_p": 1.0,
        "seed": 3,
        "max_tokens": 4,
        "stop": [],
        "presence_penalty": 0.5,
        "frequency_penalty": 0.0,
        "logit_bias": {"7": -100.0},
    }
    message = {"messages": [{"role": "user", "content": "x"}], "sampling": sampling, "logprobs": 2}
    with pytest.raises(WorkerRequestError) as info:
        async for _ in backend.generate(message):
            pass
    assert info.value.kind == "context"
    sent = fake.requests[-1]
    assert sent["presence_penalty"] == 0.5 and sent["logit_bias"] == {"7": -100.0}
    assert sent["logprobs"] is True and sent["top_logprobs"] == 2


async def test_generate_through_worker_process() -> None:
    model = await load_fake(devices=("cuda:2", "cuda:5"))
    try:
        assert isinstance(model, LoadedModel)
        assert model.memory.per_device_mb == {"cuda:2": 100, "cuda:5": 101}
        assert model.context_length == 64
        text, final = await collect(model, user_request("one two three four"))
        assert text == "one two three four"
        assert final.finish_reason == "stop"
        assert final.usage.completion_tokens == 4
        text, final = await collect(model, user_request("one two three four", max_tokens=2))
        assert (text, final.finish_reason) == ("one two", "length")
        # Native output on stdout must not corrupt the protocol.
        text, _ = await collect(model, user_request("noise"))
        assert text == "noise"
        with pytest.raises(ContextLengthExceeded):
            await collect(model, user_request("w " * 100))
        together = await asyncio.gather(*(collect(model, user_request(f"a{i} b{i}")) for i in range(5)))
        assert [t for t, _ in together] == [f"a{i} b{i}" for i in range(5)]
    finally:
        await model.unload()
    assert model._process.returncode == 0


async def test_aclose_aborts_in_the_worker() -> None:
    model = await load_fake()
    try:
        stream = model.generate(user_request("slow"))
        assert isinstance(await anext(stream), Delta)
        await stream.aclose()  # type: ignore[attr-defined]
        text, _ = await asyncio.wait_for(collect(model, user_request("still alive")), timeout=10)
        assert text == "still alive"
        assert not model._streams
    finally:
        await model.unload()


async def test_abort_from_outside_ends_the_stream() -> None:
    model = await load_fake()
    try:
        final = None
        async for event in model.generate(user_request("slow")):
            if isinstance(event, Delta):
                await model.abort(RequestId("r"))
            else:
                final = event
        assert final is not None
        assert final.finish_reason == "stop"
    finally:
        await model.unload()


async def test_worker_crash_fails_only_that_model() -> None:
    model = await load_fake()
    other = await load_fake()
    try:
        with pytest.raises(EngineFault):
            await collect(model, user_request("crash"))
        assert model.fault is not None
        with pytest.raises(EngineFault):
            await collect(model, user_request("hello"))
        text, _ = await collect(other, user_request("unaffected"))
        assert text == "unaffected"
    finally:
        await model.unload()
        await other.unload()


async def test_load_error_from_worker() -> None:
    engine = MLCEngine(worker_module=FAKE_WORKER, require_mlc=False)
    with pytest.raises(ModelSourceError, match="no weights"):
        await engine.load(LoadSpec(model_id=ModelId("m"), source="missing", devices=("cuda:0",)))


async def test_unload_is_idempotent_and_ends_the_process() -> None:
    model = await load_fake()
    pid = model.pid
    await model.unload()
    await model.unload()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(EngineError):
        await collect(model, user_request("x"))
