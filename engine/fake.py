"""A scripted in-memory engine for tests of everything above the engine (manager, routing, HTTP).

The script comes from the constructor (`FakeEngine(FakeScript(...))`) and may be overridden per model
by `LoadSpec.options` with the same field names, e.g.
`LoadSpec(..., options={"tokens": ["a", "b"], "token_delay_s": 0.01, "fail_after_tokens": 3})`.

It behaves like the real engines where the layers above can observe it: `max_tokens` gives finish
`length`, the end of the script gives `stop` (like an eos), stop strings are trimmed (never partially
emitted), bad input and prompts longer than the context raise the real engines' `RequestError`s before
any delta (the checks in `engine.streaming`), closing the stream or `abort()` stops it, a scripted fault
raises `EngineFault` and poisons the model, and `unload()` is idempotent. Everything is
`asyncio.sleep`-based: it never blocks the event loop. The engine counts loads and unloads so tests can
assert "exactly one load".
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, fields, replace
from typing import Literal

from .base import (
    Delta,
    Embeddings,
    EmbedInput,
    EngineName,
    Final,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    LoadProgress,
    LoadSpec,
    MemoryReport,
    ModelId,
    ProgressCallback,
    RequestId,
    Usage,
)
from .errors import (
    ContextLengthExceeded,
    EngineError,
    EngineFault,
    InsufficientMemory,
    LoadError,
    ModelSourceError,
    RequestError,
    TransientLoadError,
)
from .streaming import check_context, check_input, check_usable, completion_budget, validate_sampling
from .textstream import StopStringMatcher

log = logging.getLogger(__name__)

FailKind = Literal["source", "transient", "memory", "load"]


@dataclass(frozen=True, kw_only=True, slots=True)
class FakeScript:
    """What a fake model does. Every field may also be given in `LoadSpec.options`."""

    # The deltas a generation emits, in order; the end of the list finishes with `stop` (an "eos").
    tokens: tuple[str, ...] = ("Hello", ",", " world", "!")
    # Emit the last message's (or the prompt's) words instead of `tokens`.
    echo: bool = False
    token_delay_s: float = 0.0
    load_delay_s: float = 0.0
    # Report a download of this many bytes during the first half of `load_delay_s` (phase
    # "downloading", with bytes, rate and time left), as a hub download would.
    download_bytes: int = 0
    # Fail every load with this message (or only the first `fail_load_times` loads, when set).
    fail_load: str | None = None
    fail_load_kind: FailKind = "source"
    fail_load_times: int | None = None
    # Raise EngineFault after emitting this many deltas (the model is then failed).
    fail_after_tokens: int | None = None
    memory_mb: int = 100
    device_memory_mb: Mapping[str, int] | None = None
    context_length: int = 4096
    # Embedding models (`LoadSpec.task == "embed"`): the vectors' length, and whether shorter
    # `dimensions` may be asked for (Matryoshka: truncated and renormalised).
    embedding_dimensions: int = 8
    matryoshka: bool = False

    @classmethod
    def from_options(cls, base: FakeScript, options: Mapping[str, object]) -> FakeScript:
        """`base` with the fields named in `options` replaced; an unknown name is a `ModelSourceError`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ModelSourceError(f"unknown fake engine option(s): {', '.join(unknown)}")
        values = dict(options)
        if "tokens" in values:
            tokens = values["tokens"]
            if not isinstance(tokens, list | tuple) or not all(isinstance(t, str) for t in tokens):
                raise ModelSourceError("fake engine option tokens must be a list of strings")
            values["tokens"] = tuple(tokens)
        return replace(base, **values)  # type: ignore[arg-type]


async def _download(script: FakeScript, report: ProgressCallback) -> None:
    """Half of the load delay spent "downloading" `download_bytes`, reported in ten even steps."""
    steps, total = 10, script.download_bytes
    step_s = script.load_delay_s / 2 / steps
    rate = total / (script.load_delay_s / 2) if script.load_delay_s > 0 else None
    for i in range(steps + 1):
        done = total * i // steps
        report(
            LoadProgress(
                phase="downloading",
                fraction=done / total,
                done_bytes=done,
                total_bytes=total,
                bytes_per_s=rate,
            )
        )
        if i < steps:
            await asyncio.sleep(step_s)


def count_tokens(text: str) -> int:
    """The fake's tokenizer: one token per whitespace-separated word (at least one)."""
    return max(1, len(text.split()))


class FakeModel:
    """A loaded fake model. Implements `LoadedModel`; exposes counters for tests."""

    def __init__(self, *, engine: FakeEngine, spec: LoadSpec, script: FakeScript) -> None:
        self._engine = engine
        self._model_id = spec.model_id
        self._script = script
        device_mb = dict(script.device_memory_mb or {spec.devices[0]: script.memory_mb})
        self._memory = MemoryReport(per_device_mb=device_mb)
        self._context_length = spec.context_length or script.context_length
        self._task = spec.task
        self._aborted: set[RequestId] = set()
        self._lock = asyncio.Lock()  # one sequence at a time, like the transformers engine
        self.fault: str | None = None
        self.unloaded = False
        self.requests_finished = 0
        self.requests_cancelled = 0
        self.in_flight = 0

    @property
    def model_id(self) -> ModelId:
        return self._model_id

    @property
    def memory(self) -> MemoryReport:
        return self._memory

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def waiting(self) -> int:
        return 0  # every scripted request runs at once

    @property
    def script(self) -> FakeScript:
        return self._script

    def _check(self, request: GenerationRequest) -> tuple[int, tuple[str, ...], str]:
        check_usable(self._model_id, fault=self.fault, unloaded=self.unloaded)
        if self._task == "embed":
            raise RequestError(f"the model '{self._model_id}' is an embedding model", param="model")
        param = check_input(request)
        if request.messages is not None:
            if not request.messages:
                raise RequestError("messages must not be empty", param="messages")
            text = "\n".join(m.content for m in request.messages)
            last = request.messages[-1].content
        else:
            text = last = request.prompt or ""
        validate_sampling(request.sampling)
        n_prompt = count_tokens(text)
        check_context(
            n_prompt=n_prompt,
            max_tokens=request.sampling.max_tokens,
            context_length=self._context_length,
            param=param,
        )
        script_tokens = (
            tuple(w if i == 0 else " " + w for i, w in enumerate(last.split()))
            if self._script.echo
            else self._script.tokens
        )
        return n_prompt, script_tokens, param

    def count_tokens(self, request: GenerationRequest) -> int:
        """The prompt tokens `request` would take (checked as `generate` checks it)."""
        return self._check(request)[0]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        n_prompt, script_tokens, _ = self._check(request)
        self._engine.requests_total += 1
        s = request.sampling
        max_new = completion_budget(
            n_prompt=n_prompt, max_tokens=s.max_tokens, context_length=self._context_length
        )
        stops = StopStringMatcher(s.stop)
        finished = False
        self.in_flight += 1
        try:
            async with self._lock:
                completion = 0
                finish: FinishReason = "stop"
                for token in script_tokens:
                    if completion >= max_new:
                        finish = "length"
                        break
                    if request.request_id in self._aborted:
                        break
                    if self._script.token_delay_s > 0:
                        await asyncio.sleep(self._script.token_delay_s)
                    else:
                        await asyncio.sleep(0)
                    fail_after = self._script.fail_after_tokens
                    if fail_after is not None and completion >= fail_after:
                        self.fault = f"scripted fault after {fail_after} tokens"
                        raise EngineFault(f"model {self._model_id} failed: {self.fault}")
                    if self.unloaded:
                        raise EngineError(f"model {self._model_id} was unloaded during generation")
                    completion += 1
                    out, stopped = stops.feed(token)
                    if out:
                        yield Delta(text=out)
                    if stopped:
                        break
                rest = stops.flush()
                if rest:
                    yield Delta(text=rest)
                finished = True
                self.requests_finished += 1
                yield Final(
                    usage=Usage(prompt_tokens=n_prompt, completion_tokens=completion),
                    finish_reason=finish,
                )
        finally:
            self.in_flight -= 1
            self._aborted.discard(request.request_id)
            if not finished:
                self.requests_cancelled += 1

    @property
    def dimensions(self) -> int:
        return self._script.embedding_dimensions

    async def embed(self, inputs: tuple[EmbedInput, ...], *, dimensions: int | None = None) -> Embeddings:
        """Deterministic unit vectors from a hash of each input (a text and its "token ids" differ);
        tokens: a text's words, or the number of ids. Checks what the real engine checks."""
        check_usable(self._model_id, fault=self.fault, unloaded=self.unloaded)
        if self._task != "embed":
            raise RequestError(f"the model '{self._model_id}' is not an embedding model", param="model")
        size = self._script.embedding_dimensions
        if dimensions is not None and dimensions != size:
            if not self._script.matryoshka:
                raise RequestError(f"the model '{self._model_id}' has no shorter vectors", param="dimensions")
            if not 1 <= dimensions <= size:
                raise RequestError(f"'dimensions' must be between 1 and {size}", param="dimensions")
        if not inputs:
            raise RequestError("'input' must not be empty", param="input")
        self._engine.requests_total += 1
        vectors: list[tuple[float, ...]] = []
        tokens = 0
        for item in inputs:
            n = count_tokens(item) if isinstance(item, str) else len(item)
            if n > self._context_length:
                raise ContextLengthExceeded(
                    f"an input is {n} tokens, more than the context ({self._context_length})", param="input"
                )
            tokens += n
            digest = hashlib.sha256(repr(item).encode()).digest() * (1 + size // 32)
            raw = [b / 255.0 - 0.5 for b in digest[:size]][: dimensions or size]
            norm = math.sqrt(sum(x * x for x in raw)) or 1.0
            vectors.append(tuple(x / norm for x in raw))
        await asyncio.sleep(self._script.token_delay_s)
        return Embeddings(vectors=tuple(vectors), prompt_tokens=tokens)

    async def abort(self, request_id: RequestId) -> None:
        self._aborted.add(request_id)

    async def unload(self) -> None:
        if self.unloaded:
            return
        self.unloaded = True
        self._engine.unloads[self._model_id] += 1
        self._engine.loaded.pop(self._model_id, None)


class FakeEngine:
    """Scripted engine; see the module docstring. Implements `Engine`.

    Counters: `loads[model_id]` (successful loads), `load_attempts[model_id]` (including failures),
    `unloads[model_id]`, `requests_total`; `loaded` maps model ids to the live `FakeModel`s.
    """

    def __init__(self, script: FakeScript | None = None) -> None:
        self.script = script or FakeScript()
        self.loads: Counter[ModelId] = Counter()
        self.load_attempts: Counter[ModelId] = Counter()
        self.unloads: Counter[ModelId] = Counter()
        self.requests_total = 0
        self.loaded: dict[ModelId, FakeModel] = {}

    @property
    def name(self) -> EngineName:
        return "fake"

    async def load(self, spec: LoadSpec, progress: ProgressCallback | None = None) -> FakeModel:
        script = FakeScript.from_options(self.script, spec.options)
        self.load_attempts[spec.model_id] += 1
        attempt = self.load_attempts[spec.model_id]

        def report(p: LoadProgress) -> None:
            if progress is not None:
                progress(p)

        report(LoadProgress(phase="resolving"))
        if script.download_bytes > 0:
            await _download(script, report)
        steps = 4
        for i in range(steps):
            report(LoadProgress(phase="loading", fraction=i / steps))
            await asyncio.sleep(script.load_delay_s / steps)
        if script.fail_load is not None and (
            script.fail_load_times is None or attempt <= script.fail_load_times
        ):
            error: type[LoadError] = {
                "source": ModelSourceError,
                "transient": TransientLoadError,
                "memory": InsufficientMemory,
                "load": LoadError,
            }[script.fail_load_kind]
            raise error(script.fail_load)
        report(LoadProgress(phase="warming", fraction=1.0))
        model = FakeModel(engine=self, spec=spec, script=script)
        self.loads[spec.model_id] += 1
        self.loaded[spec.model_id] = model
        log.debug("fake engine loaded %s (load #%d)", spec.model_id, self.loads[spec.model_id])
        return model
