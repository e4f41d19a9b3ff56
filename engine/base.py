"""The engine contract: neutral dataclasses and the `Engine` / `LoadedModel` protocols.

Everything above the engine (the agent's model manager, the HTTP edge) speaks only these types;
OpenAI-shaped objects exist only at the HTTP edge (`helexa.mesh.server.openai_wire`). Engines:

- `engine.transformers_engine.TransformersEngine` — PyTorch + transformers, CPU and CUDA.
- `engine.mlc_engine.MLCEngine` — MLC-LLM in a supervised worker process (CUDA hosts, optional).
- `engine.fake.FakeEngine` — scripted tokens, delays and failures for tests above the engine.

Lifecycle: `Engine.load(spec)` returns a `LoadedModel` handle. `LoadedModel.generate(request)` is an
async iterator of `Delta` events followed by exactly one `Final`. Closing the iterator early (the
client went away: `aclose()`, or the consuming task is cancelled) aborts that request inside the
engine; `abort(request_id)` does the same from outside. `unload()` frees the memory and is idempotent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NewType, Protocol, runtime_checkable

ModelId = NewType("ModelId", str)
RequestId = NewType("RequestId", str)

FinishReason = Literal["stop", "length"]
Role = Literal["system", "user", "assistant", "tool", "developer"]
EngineName = Literal["transformers", "mlc", "fake"]
# What a loaded model does: generate text, or embed inputs into vectors (`EmbeddingModel`).
ModelTask = Literal["generate", "embed"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ToolCall:
    """A function call the assistant made: `arguments` is the JSON text the model produced."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, kw_only=True, slots=True)
class ToolSpec:
    """A function the model may call (OpenAI's `tools[].function`)."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object


@dataclass(frozen=True, kw_only=True, slots=True)
class ChatMessage:
    """One chat turn with its content flattened to text (the HTTP edge joins content parts).

    An assistant turn may carry the `tool_calls` it made; a `tool` turn answers one of them
    (`tool_call_id`)."""

    role: Role
    content: str
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


@runtime_checkable
class TokenConstraint(Protocol):
    """The sampling pipeline's mask hook, applied per sequence inside a batch.

    `mask(logits)` gets the sequence's logits row (a 1-D tensor over the vocabulary, on the model's
    device) and sets the scores of tokens that are not allowed next to `-inf`, in place. `accept(token)`
    is called with each token chosen. `done` is true once the constraint is complete (the generation
    ends with `finish_reason` "stop").
    """

    def mask(self, logits: Any) -> None: ...

    def accept(self, token_id: int) -> None: ...

    def remaining(self, tokens: int) -> None:
        """How many tokens are left before `max_tokens` ends the generation (told before each mask), so
        the constraint can steer toward a complete output while there is still room."""
        ...

    @property
    def done(self) -> bool: ...


@dataclass(frozen=True, kw_only=True, slots=True)
class SamplingParams:
    """Sampling controls. `temperature == 0` means greedy; `top_k == 0` means no top-k cut.

    `max_tokens=None` means "until the context is full". `seed=None` means nondeterministic; the same
    seed with the same prompt and parameters gives the same output on the same host.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # Tokens whose probability is below `min_p` times the most likely token's are dropped (0 = off).
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    # Token ids that end the generation like EOS does (in addition to the model's own EOS).
    stop_token_ids: tuple[int, ...] = ()
    # OpenAI's penalties on tokens already generated: `presence` once per token seen, `frequency` per
    # occurrence (both subtracted from the logit, range -2..2); `repetition` (vLLM/HF, > 0, 1 = off)
    # divides positive and multiplies negative logits of tokens in the prompt or the output.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # (token id, bias) pairs added to the logits before sampling (-100 bans a token, 100 forces it).
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Keep generating past EOS (benchmarks; vLLM's `ignore_eos`): only max_tokens or a stop ends it.
    ignore_eos: bool = False
    # A constrained-decoding hook (structured output, tool calls): masks the logits before each sample
    # and is told every token chosen. Not part of equality (it is per-request state).
    constraint: TokenConstraint | None = field(default=None, compare=False)


@dataclass(frozen=True, kw_only=True, slots=True)
class ResponseFormat:
    """Structured output the engine must enforce by constrained decoding (never hoped for).

    `json_object`: any JSON object; `json_schema`: a JSON value valid under `schema`. The engine refuses
    a schema it cannot enforce with a `RequestError` naming the feature.
    """

    type: Literal["json_object", "json_schema"]
    schema: dict[str, Any] | None = None
    # Where the schema came from in the client's request (errors name it).
    param: str = "response_format"


@dataclass(frozen=True, kw_only=True, slots=True)
class GenerationRequest:
    """Exactly one of `prompt` (raw completion) and `messages` (chat, rendered by the chat template)."""

    request_id: RequestId
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    # A prompt already tokenized (`/v1/completions` accepts token ids); used instead of `prompt`.
    prompt_ids: tuple[int, ...] | None = None
    # Fill in the middle: generate what goes between `prompt` and `suffix` (models with FIM tokens).
    suffix: str | None = None
    # Log probabilities of generated tokens: None = not asked; k >= 0 = the chosen token and its k
    # most likely alternatives (OpenAI caps k at 20).
    logprobs: int | None = None
    # Log probabilities of the prompt's own tokens (completions `echo` with `logprobs`).
    prompt_logprobs: bool = False
    # Structured output, enforced by constrained decoding.
    response_format: ResponseFormat | None = None
    # Functions the model may call, rendered with the model's chat template. `tool_choice`: "auto" (the
    # model decides), "none" (no call: tools are not rendered), "required" (at least one call), or a
    # function's name (exactly that function); the last two are enforced by constrained decoding.
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: str = "auto"
    parallel_tool_calls: bool = True


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenLogprob:
    """One token with its log probability under the model (before sampling's temperature, penalties and
    cuts) and, when asked for, the most likely alternatives at that position."""

    token_id: int
    text: str  # the token decoded alone (may be a partial character: "\ufffd")
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()  # (token id, text, logprob), most likely first


@dataclass(frozen=True, kw_only=True, slots=True)
class Delta:
    """A piece of newly decoded text (never a broken multi-byte character; never empty).

    `logprobs` (when the request asked for them) holds the tokens generated since the previous delta;
    text held back by a stop string or an incomplete character may make them run ahead of `text`.
    """

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, kw_only=True, slots=True)
class Final:
    """The last event of every generation.

    `logprobs`: generated tokens not yet sent with a delta (held back, or ending the text).
    `prompt_logprobs`: with `GenerationRequest.prompt_logprobs`, one entry per prompt token, as
    `/v1/completions` `echo` reports them; the first token's logprob is NaN (nothing predicts it).
    """

    usage: Usage
    finish_reason: FinishReason
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] = ()


GenerationEvent = Delta | Final


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadSpec:
    """What to load and where.

    `source` is a local directory (already resolved to an absolute path by the catalogue), a Hugging
    Face repo id (downloaded into `cache_dir`, the HF cache when None), or a GGUF file: a local
    `.gguf` path or `org/name:file.gguf` in a hub repo. `devices` are explicit device
    names: `("cpu",)` or `("cuda:0", "cuda:1")` (more than one means tensor parallel where supported).
    """

    model_id: ModelId
    source: str
    devices: tuple[str, ...] = ("cpu",)
    revision: str | None = None
    quant: str | None = None
    context_length: int | None = None
    # The memory the catalogue gives this model (weights plus KV cache), in MB; None = unknown. An
    # engine that batches keeps its KV cache inside what is left after the weights.
    memory_mb: int | None = None
    cache_dir: Path | None = None
    # Where converted GGUF sources are cached (`engine.gguf`; None = ~/.cache/helexa/gguf) and the
    # cache's bound in MB (None = `engine.gguf.DEFAULT_CACHE_MB`).
    gguf_cache_dir: Path | None = None
    gguf_cache_mb: int | None = None
    # `embed` loads an encoder or embedding model (an `EmbeddingModel`) instead of a causal LM.
    task: ModelTask = "generate"
    # Engine-specific extras (the fake engine reads its script from here).
    options: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryReport:
    """Memory a loaded model actually uses, measured after load and warm-up, per device name."""

    per_device_mb: dict[str, int]

    @property
    def total_mb(self) -> int:
        return sum(self.per_device_mb.values())


LoadPhase = Literal["resolving", "downloading", "converting", "loading", "warming"]


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadProgress:
    """Progress of a load: a phase name and a fraction in [0, 1] (None when unknown).

    While `downloading`, the bytes: `done_bytes` of `total_bytes` (what is already in the cache, resumed
    partial files included, counts as done) and the recent rate, so an operator can tell a stuck download
    from a slow one and see when it ends (`eta_s`)."""

    phase: LoadPhase
    fraction: float | None = None
    done_bytes: int | None = None
    total_bytes: int | None = None
    bytes_per_s: float | None = None

    @property
    def eta_s(self) -> float | None:
        return eta_s(self.done_bytes, self.total_bytes, self.bytes_per_s)


def eta_s(done_bytes: int | None, total_bytes: int | None, bytes_per_s: float | None) -> float | None:
    """Seconds until a transfer ends at the current rate; None when the rate or the total is unknown."""
    if total_bytes is None or done_bytes is None or not bytes_per_s:
        return None
    return max(0.0, (total_bytes - done_bytes) / bytes_per_s)


ProgressCallback = Callable[[LoadProgress], None]


@runtime_checkable
class LoadedModel(Protocol):
    """A model resident in memory on this host."""

    @property
    def model_id(self) -> ModelId: ...

    @property
    def memory(self) -> MemoryReport: ...

    @property
    def context_length(self) -> int: ...

    @property
    def waiting(self) -> int:
        """Requests accepted but waiting for room in the running batch (the fleet view's `queued`)."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Stream deltas then one `Final`. Raises `engine.errors.RequestError` subclasses for bad
        input (before any delta) and `engine.errors.EngineFault` when the model itself broke."""
        ...

    async def abort(self, request_id: RequestId) -> None: ...

    async def unload(self) -> None: ...


# One input to embed: a text, or text already tokenized (token ids).
EmbedInput = str | tuple[int, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class Embeddings:
    """The vectors of `EmbeddingModel.embed`, one per input in input order, and the tokens it read."""

    vectors: tuple[tuple[float, ...], ...]
    prompt_tokens: int


@runtime_checkable
class EmbeddingModel(LoadedModel, Protocol):
    """A loaded encoder or embedding model (`LoadSpec.task == "embed"`); its `generate` refuses."""

    @property
    def dimensions(self) -> int:
        """The length of the vectors it returns by default."""
        ...

    async def embed(self, inputs: tuple[EmbedInput, ...], *, dimensions: int | None = None) -> Embeddings:
        """Embed every input (pooled and normalised as the model's config says). `dimensions` asks for
        shorter vectors: models trained for it (Matryoshka) truncate and renormalise, others raise a
        `RequestError` naming `dimensions`; an input longer than the context raises
        `ContextLengthExceeded` naming `input`. Runs off the event loop."""
        ...


@runtime_checkable
class Engine(Protocol):
    """Loads models. Implementations import their heavy libraries inside `load`, never at import."""

    @property
    def name(self) -> EngineName: ...

    async def load(self, spec: LoadSpec, progress: ProgressCallback | None = None) -> LoadedModel: ...
