"""The portable engine: PyTorch + transformers on CPU or one CUDA device.

Design (see MISSION "Engines"):

- `TransformersEngine.load` resolves the weights (a local directory, or a Hugging Face repo id
  downloaded into the HF cache), loads model and tokenizer in a worker thread, runs a short warm-up and
  measures the memory the model actually uses (CPU: growth of the process RSS; CUDA: growth of the
  memory the caching allocator reserves on the device), floored at the size of the weights.
- Each loaded model owns **one inference thread** running a continuous-batching loop: take what
  arrived, end cancelled requests, admit waiting requests while the KV budget allows (`_fits`), run one
  prefill forward, then one decode step for every running sequence. The prefill forward is either the
  short fresh prompts admitted together (left-padded, one forward: the weights are read once and they
  start decoding together) or one `PREFILL_CHUNK_TOKENS` chunk of one prompt, so a long prompt never
  stalls the batch for long and cancellation is seen between chunks. A prefilled sequence joins the
  running rows in one left-padded `DynamicCache` (`kvbatch.BatchCache`) and leaves it the step it
  ends. Sampling is per row (`sampling.py`: per-request generator, penalties, logit_bias, the
  constraint mask); recent prompts' KV is reused (`prefix.py`).
- Text is decoded incrementally with `tokenizers.decoders.DecodeStream` (never a broken multi-byte
  character) and passed through a `StopStringMatcher` (stop strings are trimmed and never partially
  emitted). Deltas reach the event loop through an `asyncio.Queue` fed by `loop.call_soon_threadsafe`.
- Closing the async generator (client gone, task cancelled) or `abort()` sets a flag the loop checks
  every turn, so the request's row and KV are freed at once.
- Errors: a bad request raises a `RequestError` before any delta; a device fault (CUDA/accelerator
  error) raises `EngineFault` and poisons only this model (every later request fails fast with
  `EngineFault` until the manager unloads and reloads it); any other failure in one generation raises a
  plain `EngineError` and the model keeps serving.

torch and transformers are imported only inside `load` (and the threads it starts), never at import.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import gc
import inspect
import json
import logging
import math
import os
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import psutil

from .base import (
    ChatMessage,
    Delta,
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
    ResponseFormat,
    SamplingParams,
    TokenConstraint,
    TokenLogprob,
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
)
from .sources import DTYPES, resolve_source
from .streaming import (
    EventChannel,
    InFlight,
    check_context,
    check_input,
    check_usable,
    completion_budget,
    validate_sampling,
)
from .textstream import StopStringMatcher
from .toolcalls import family_of, generic_tool_turns

log = logging.getLogger(__name__)

T = TypeVar("T")

# Substrings of torch error messages that mean the device itself is in a bad state.
_DEVICE_FAULT_MARKERS = (
    "CUDA error",
    "device-side assert",
    "illegal memory access",
    "CUBLAS_STATUS",
    "CUDNN_STATUS",
    "unspecified launch failure",
)
# Fallback context length when neither the spec nor the config says.
_DEFAULT_CONTEXT_LENGTH = 2048
# Loads measure memory as process/device growth; one at a time keeps the measurements apart.
_MEASURE_LOCK = threading.Lock()

CancelReason = Literal["client", "abort", "unload"]

# Sequences decoding together at most. Past ~16 a CPU gains little per added row (the step is bound by
# matmul width), and every row adds latency to all the others.
MAX_BATCH_SEQUENCES = 32
# Prompt tokens fed per prefill step: a long prompt is interleaved with decode steps of the running
# batch in chunks this size, so it delays the others by one chunk's forward pass at a time.
PREFILL_CHUNK_TOKENS = 256
# Padded tokens of one grouped prefill (several short prompts that arrived together, one forward).
PREFILL_GROUP_TOKENS = 4 * PREFILL_CHUNK_TOKENS
# torch's intra-op threads, chosen per phase on CPU (HELEXA_PREFILL_THREADS / HELEXA_DECODE_THREADS
# override them). Measured here (scripts/bench engine): a decode step is a thin matmul bound by memory,
# and a second thread gave no gain while doubling CPU per token; worse, with another busy process on a
# 2-core box two threads spin against each other (a tiny model's step went from 1 ms to 35 ms). A
# prefill chunk is a wide matmul that a second thread cut by about 40 % on the 0.5B model.
DECODE_THREADS = 1
PREFILL_THREADS = max(1, min(4, os.cpu_count() or 1))
# A decode step of many rows on a model of real size is wide enough for the prefill's threads: measured on
# the 0.5B-shaped model at 16 rows (scripts/bench concurrency), 2 threads gave 26.6-31.0 tok/s against
# 25.3 with 1 (transformers serve: 28.5-29.9 in the same runs). The row threshold is a guess between the
# measured 1 (no gain) and 16; HELEXA_DECODE_THREADS, when set, fixes the decode threads instead.
WIDE_DECODE_ROWS = 8
WIDE_DECODE_MIN_PARAMETERS = 50_000_000
# The prefix cache (`engine.prefix`) may hold 1/this of the KV budget; the running batch the rest.
PREFIX_CACHE_DIVISOR = 4
# KV cache the batch may use when the catalogue gives no memory_mb for the model (never "a share of all
# RAM"): enough for a few dozen short conversations on the small models a CPU serves.
DEFAULT_KV_BUDGET_MB = 512


def is_device_fault(exc: BaseException) -> bool:
    """True when `exc` means the accelerator is in a bad state (the model must be reloaded), as
    opposed to a problem with one request (shape, NaN, out of memory for this sequence)."""
    import torch  # noqa: PLC0415 -- lazy: an idle agent must not import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _DEVICE_FAULT_MARKERS)


@dataclass(eq=False, kw_only=True)
class _Job:
    """One request travelling from the event loop to the model's inference thread and back."""

    request_id: RequestId
    prompt_ids: list[int]
    sampling: SamplingParams
    loop: asyncio.AbstractEventLoop
    logprobs: int | None = None
    prompt_logprobs: bool = False
    channel: EventChannel = field(default_factory=EventChannel)
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_reason: CancelReason | None = None

    def request_cancel(self, reason: CancelReason) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason
        self.cancel.set()

    def send(self, item: GenerationEvent | BaseException) -> None:
        """Hand an event to the consumer (thread-safe). A closed loop means nobody listens any more."""
        try:
            self.loop.call_soon_threadsafe(self.channel.put, item)
        except RuntimeError:
            self.request_cancel("client")


class _Detokenizer:
    """Incremental detokenisation with `DecodeStream`, plus a final flush so that the concatenated
    output always equals decoding all generated ids at once."""

    def __init__(self, raw_tokenizer: Any) -> None:
        from tokenizers.decoders import DecodeStream  # noqa: PLC0415 -- lazy, like torch

        self._raw = raw_tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []
        self._emitted: list[str] = []

    def step(self, token_id: int) -> str:
        self._ids.append(token_id)
        chunk = self._stream.step(self._raw, token_id)
        if chunk:
            self._emitted.append(chunk)
            return str(chunk)
        return ""

    def flush(self) -> str:
        """Text still held by the stream at the end (e.g. an incomplete byte sequence)."""
        full = str(self._raw.decode(self._ids, skip_special_tokens=True))
        emitted = "".join(self._emitted)
        return full[len(emitted) :] if full.startswith(emitted) else ""


class _Runtime:
    """Everything heavy a loaded model holds; dropped as a whole on unload."""

    def __init__(
        self,
        *,
        model: Any,
        tokenizer: Any,
        device: str,
        eos_ids: frozenset[int],
        vocab_limit: int,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.raw_tokenizer = tokenizer.backend_tokenizer
        self.device = device
        self.eos_ids = eos_ids
        self.vocab_limit = vocab_limit
        params = inspect.signature(model.forward).parameters
        # transformers 5.24 renamed `past_key_values` to `cache`; accept both (5.17 to 5.25).
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.has_logits_to_keep = "logits_to_keep" in params
        # The longest text one token can stand for (characters of its vocabulary entry): a text longer
        # than `context_length * max_token_chars` cannot fit the context, whatever it says, so it is
        # refused before the tokenizer ever sees it (issue: a 15 MB prompt took 4-6 GB to tokenize).
        vocab = tokenizer.get_vocab()
        self.max_token_chars = max((len(piece) for piece in vocab), default=1) + 1
        self._texts: dict[int, str] = {}

    def new_cache(self) -> Any:
        from transformers import DynamicCache  # noqa: PLC0415 -- lazy: transformers imports torch

        return DynamicCache(config=self.model.config)

    def forward(self, inputs: dict[str, Any], cache: Any) -> Any:
        """Run the model on `inputs` (`input_ids` of shape [B, n], plus a batch's attention mask and
        positions) extending `cache`; return each row's last logits [B, V]."""
        kwargs: dict[str, Any] = {self.cache_kwarg: cache, "use_cache": True}
        if self.has_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(**inputs, **kwargs)
        return out.logits[:, -1, : self.vocab_limit]

    def forward_all(self, inputs: dict[str, Any], cache: Any) -> Any:
        """Like `forward` for one row, with the logits of every position [n, V] (prompt logprobs)."""
        kwargs: dict[str, Any] = {self.cache_kwarg: cache, "use_cache": True}
        out = self.model(**inputs, **kwargs)
        return out.logits[0, :, : self.vocab_limit]

    def token_text(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = str(self.raw_tokenizer.decode([token_id], skip_special_tokens=False))
            if len(self._texts) < 1_000_000:
                self._texts[token_id] = text
        return text

    def logprob_entries(self, logits: Any, tokens: list[int], top: int) -> list[TokenLogprob]:
        """`TokenLogprob`s for `tokens`, each chosen after the matching row of `logits` ([n, V], raw)."""
        import torch  # noqa: PLC0415 -- lazy: an idle agent must not import torch

        lp = torch.log_softmax(logits.float(), dim=-1)
        chosen = lp.gather(1, torch.tensor(tokens, device=lp.device).unsqueeze(1)).squeeze(1).tolist()
        alternatives: list[list[tuple[int, str, float]]] = [[] for _ in tokens]
        if top > 0:
            values, ids = torch.topk(lp, min(top, lp.shape[1]), dim=-1)
            for i, (vs, ts) in enumerate(zip(values.tolist(), ids.tolist(), strict=True)):
                alternatives[i] = [
                    (int(t), self.token_text(int(t)), float(v)) for v, t in zip(vs, ts, strict=True)
                ]
        return [
            TokenLogprob(token_id=t, text=self.token_text(t), logprob=float(c), top=tuple(alts))
            for t, c, alts in zip(tokens, chosen, alternatives, strict=True)
        ]

    def sample(self, logits: Any, rows: list[Any]) -> list[int]:
        """The next token of every row (`engine.sampling.sample`)."""
        from .sampling import sample  # noqa: PLC0415 -- lazy: imports torch

        return sample(logits, rows)


@dataclass(eq=False, kw_only=True)
class _Seq:
    """A request inside the inference thread: prefilling (own cache) or decoding (a row of the batch)."""

    job: _Job
    row: Any  # engine.sampling.RowState
    detok: _Detokenizer
    stops: StopStringMatcher
    max_new: int
    cache: Any = None  # while prefilling
    prefilled: int = 0
    completion: int = 0
    last: int = 0  # the token fed at the next decode step
    finish: FinishReason | None = None
    stopped: bool = False  # a stop string or token ended it (no flush of held-back text)
    generated: list[int] = field(default_factory=list)
    first_logits: Any = None  # the whole prompt came from the prefix cache: its last logits
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet sent with a delta
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def reserve(self) -> int:
        """KV positions this sequence may come to hold (prompt plus the whole completion budget)."""
        return len(self.job.prompt_ids) + self.max_new


class TransformersModel:
    """A model loaded by `TransformersEngine`; see the module docstring. Implements `LoadedModel`."""

    def __init__(
        self,
        *,
        model_id: ModelId,
        runtime: _Runtime,
        context_length: int,
        memory: MemoryReport,
        kv_budget_tokens: int | None = None,
        max_batch: int = MAX_BATCH_SEQUENCES,
        prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS,
    ) -> None:
        self._model_id = model_id
        self._runtime: _Runtime | None = runtime
        self._context_length = context_length
        self._memory = memory
        # KV positions the running batch may hold (rows x padded length); None = no bound but the batch
        # size. Requests that do not fit wait (`waiting`), in arrival order.
        self.kv_budget_tokens = kv_budget_tokens
        self.max_batch = max(1, max_batch)
        self.prefill_chunk_tokens = max(1, prefill_chunk_tokens)
        self.peak_kv_tokens = 0  # the most KV positions the batch ever held (tests, the bench)
        self.peak_batch = 0
        self.peak_prefill_group = 0  # most prompts prefilled in one forward
        self.waiting = 0  # requests admitted to the thread but not yet prefilling (the budget is full)
        self._prefix: Any = None  # engine.prefix.PrefixCache, made by the inference thread
        self.prefix_reuse = True
        self.prefill_threads = _threads_setting("HELEXA_PREFILL_THREADS", PREFILL_THREADS)
        self.decode_threads = _threads_setting("HELEXA_DECODE_THREADS", DECODE_THREADS)
        self.wide_decode = "HELEXA_DECODE_THREADS" not in os.environ  # wide steps may take prefill threads
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._in_flight: InFlight[_Job] = InFlight()
        self._fault: str | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name=f"helexa-engine:{model_id}", daemon=True)
        self._thread.start()

    # -- LoadedModel -----------------------------------------------------------------------------

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
    def fault(self) -> str | None:
        """Why this model is poisoned (a device fault), or None while healthy."""
        return self._fault

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Stream the generation for `request`; see `LoadedModel.generate`."""
        self._check_usable()
        prompt_ids = await asyncio.to_thread(self._prepare, request)
        sampling = request.sampling
        if request.tools and request.tool_choice not in ("auto", "none"):
            constraint = await asyncio.to_thread(self._tool_constraint, request)
            sampling = dataclasses.replace(sampling, constraint=constraint)
        elif request.response_format is not None:
            constraint = await asyncio.to_thread(self._constraint, request.response_format)
            sampling = dataclasses.replace(sampling, constraint=constraint)
        job = _Job(
            request_id=request.request_id,
            prompt_ids=prompt_ids,
            sampling=sampling,
            loop=asyncio.get_running_loop(),
            logprobs=request.logprobs,
            prompt_logprobs=request.prompt_logprobs,
        )
        self._in_flight.add(request.request_id, job)
        self._queue.put(job)
        try:
            async for event in job.channel:
                yield event
        finally:
            if not job.channel.finished:
                # The consumer went away (aclose or cancellation): stop decoding for nobody.
                job.request_cancel("client")
            self._in_flight.discard(request.request_id, job)

    def _check_usable(self) -> _Runtime:
        runtime = self._runtime
        check_usable(self._model_id, fault=self._fault, unloaded=self._closing or runtime is None)
        assert runtime is not None  # refused above when unloaded
        return runtime

    async def abort(self, request_id: RequestId) -> None:
        for job in self._in_flight.of(request_id):
            job.request_cancel("abort")

    async def unload(self) -> None:
        if self._closing:
            await in_own_thread(self._thread.join)
            return
        self._closing = True
        for job in self._in_flight.all():
            job.request_cancel("unload")
        self._queue.put(None)
        await in_own_thread(self._thread.join)
        runtime, self._runtime = self._runtime, None
        device = runtime.device if runtime is not None else "cpu"
        del runtime
        await in_own_thread(_release_memory, device)
        log.info("unloaded %s", self._model_id)

    # -- request preparation (off the loop, in the default executor) ------------------------------

    def count_tokens(self, request: GenerationRequest) -> int:
        """The prompt tokens `request` would take, rendered and checked as `generate` does it (blocking:
        call it off the loop)."""
        return len(self._prepare(request))

    def _prepare(self, request: GenerationRequest) -> list[int]:
        """Validate and tokenize; raises `RequestError` (nothing has been emitted yet)."""
        runtime = self._check_usable()
        validate_sampling(request.sampling)
        tokenizer = runtime.tokenizer
        param = check_input(request)
        # Bounded before any tokenizing: a text longer than the context could hold at the longest
        # token per position is refused by its length alone.
        if request.prompt_ids is not None:
            return self._prepare_ids(runtime, request)
        chars = (
            len(request.prompt or "") + len(request.suffix or "")
            if request.messages is None
            else sum(len(m.content) for m in request.messages)
        )
        if chars > self._context_length * runtime.max_token_chars:
            raise ContextLengthExceeded(
                f"this model's maximum context length is {self._context_length} tokens; the "
                f"{'prompt' if param == 'prompt' else 'messages'} ({chars} characters) cannot fit in it",
                param=param,
            )
        if request.messages is not None:
            if not request.messages:
                raise RequestError("messages must not be empty", param="messages")
            if not getattr(tokenizer, "chat_template", None):
                raise RequestError(
                    f"model {self._model_id} has no chat template; use /v1/completions", param="messages"
                )
            tools = _template_tools(request)
            turns = [_template_turn(m) for m in request.messages]
            if tools is not None and family_of(tokenizer.chat_template) is None:
                turns, tools = generic_tool_turns(turns, tools), None
            try:
                text = tokenizer.apply_chat_template(
                    turns, tools=tools, tokenize=False, add_generation_prompt=True
                )
            except Exception as exc:  # jinja errors: the template rejects this conversation
                raise RequestError(f"chat template rejected the messages: {exc}", param="messages") from exc
            ids = list(tokenizer.encode(str(text), add_special_tokens=False))
        elif request.suffix is not None:
            ids = _fim_ids(self._model_id, tokenizer, request.prompt or "", request.suffix)
        else:
            ids = list(tokenizer.encode(request.prompt or "", add_special_tokens=True))
            if not ids and tokenizer.bos_token_id is not None:
                ids = [int(tokenizer.bos_token_id)]
        if not ids:
            raise RequestError("the prompt is empty", param=param)
        check_context(
            n_prompt=len(ids),
            max_tokens=request.sampling.max_tokens,
            context_length=self._context_length,
            param=param,
        )
        return ids

    def _constraint(self, fmt: ResponseFormat) -> TokenConstraint:
        """A fresh constraint enforcing `fmt` (its grammar checked first: `RequestError` if it cannot be)."""
        from .grammar import compile_format  # noqa: PLC0415 -- lazy: llguidance and torch

        runtime = self._check_usable()
        return compile_format(runtime.tokenizer, fmt)()

    def _tool_constraint(self, request: GenerationRequest) -> TokenConstraint:
        """`tool_choice` "required" (one or more calls of any tool) or a function's name (one call of it),
        in the markup of the model's template family."""
        from .grammar import compile_tools  # noqa: PLC0415 -- lazy: llguidance and torch

        runtime = self._check_usable()
        # A template without tools was given them in Hermes markup (`generic_tool_turns`).
        family = family_of(getattr(runtime.tokenizer, "chat_template", None)) or "hermes"
        if request.tool_choice == "required":
            tools, parallel = request.tools, request.parallel_tool_calls
        else:
            tools = tuple(t for t in request.tools if t.name == request.tool_choice)
            if not tools:
                raise RequestError(f"no tool named {request.tool_choice!r} in 'tools'", param="tool_choice")
            parallel = False
        return compile_tools(runtime.tokenizer, family, tools, parallel=parallel)()

    def _prepare_ids(self, runtime: _Runtime, request: GenerationRequest) -> list[int]:
        """A prompt given as token ids: each must exist in the vocabulary."""
        ids = list(request.prompt_ids or ())
        if not ids:
            raise RequestError("the prompt is empty", param="prompt")
        for i, token in enumerate(ids):
            if not 0 <= token < runtime.vocab_limit:
                raise RequestError(
                    f"prompt token {token} (position {i}) is not in this model's vocabulary "
                    f"(0..{runtime.vocab_limit - 1})",
                    param="prompt",
                )
        check_context(
            n_prompt=len(ids),
            max_tokens=request.sampling.max_tokens,
            context_length=self._context_length,
            param="prompt",
        )
        return ids

    # -- the inference thread: one scheduler loop owns the batch ----------------------------------

    def _serve(self) -> None:
        import torch  # noqa: PLC0415 -- lazy: an idle agent must not import torch

        from .kvbatch import BatchCache, batchable  # noqa: PLC0415 -- lazy: imports torch
        from .prefix import PrefixCache  # noqa: PLC0415 -- lazy: imports torch

        prefix = PrefixCache(0)
        self._prefix = prefix
        runtime = self._runtime
        big = (
            runtime is not None
            and sum(p.numel() for p in runtime.model.parameters()) >= WIDE_DECODE_MIN_PARAMETERS
        )
        current_threads = [0]

        def threads(n: int) -> None:
            """This thread's intra-op threads for the next phase (CPU only; cheap when unchanged)."""
            if self._runtime is not None and self._runtime.device == "cpu" and current_threads[0] != n:
                torch.set_num_threads(n)
                current_threads[0] = n

        waiting: collections.deque[_Job] = collections.deque()
        prefilling: list[_Seq] = []  # admitted, prompt not all in yet (several: a grouped prefill)
        running: list[_Seq] = []
        batch: BatchCache | None = None
        closing = False
        with torch.inference_mode():
            while True:
                # 1. Take what arrived: wait only when there is nothing else to do.
                idle = not waiting and not prefilling and not running
                while True:
                    try:
                        job = self._queue.get(block=idle)
                    except queue.Empty:
                        break
                    idle = False
                    if job is None:
                        closing = True
                        break
                    waiting.append(job)
                rt = self._runtime
                if closing or self._closing or rt is None:
                    break
                # 2. A faulted model answers everything with the fault; cancelled requests end now.
                if self._fault is not None:
                    fault = EngineFault(f"model {self._model_id} is failed: {self._fault}")
                    for seq in (*running, *prefilling):
                        seq.job.send(fault)
                    for job in waiting:
                        job.send(fault)
                    waiting.clear()
                    running, prefilling, batch = [], [], None
                    continue
                for job in [j for j in waiting if j.cancel.is_set()]:
                    waiting.remove(job)
                    self._finish_cancelled(job, completion=0)
                for seq in [s for s in prefilling if s.job.cancel.is_set()]:
                    prefilling.remove(seq)
                    self._finish_cancelled(seq.job, completion=0)
                gone = [i for i, seq in enumerate(running) if seq.job.cancel.is_set()]
                if gone and batch is not None:
                    for i in gone:
                        self._finish_cancelled(running[i].job, completion=running[i].completion)
                    keep = [i for i in range(len(running)) if i not in gone]
                    batch.keep(keep)
                    running = [running[i] for i in keep]
                # 3. Admit the next waiting request if the batch has room for it; while the admitted ones
                # are all short fresh prompts, admit more of those (one grouped prefill forward for all).
                prefix.max_tokens = self._prefix_tokens()
                while (
                    waiting
                    and self._fits([*running, *prefilling], waiting[0])
                    and (not prefilling or self._joins_group(prefilling, waiting[0]))
                ):
                    job = waiting.popleft()
                    grouping = self._groupable(job) and (
                        bool(prefilling) or (bool(waiting) and self._joins_group([], waiting[0]))
                    )
                    prefilling.append(self._admit(rt, job, prefix, whole_only=grouping))
                self.waiting = len(waiting)
                # 4. One forward of prefill: the grouped fresh prompts together, else one chunk of the first
                # admitted request's prompt (a long prompt never stalls the batch for long). A request whose
                # whole prompt is in gets its first token and joins the batch.
                if prefilling:
                    group = self._group(prefilling)
                    work = group if len(group) > 1 else prefilling[:1]
                    try:
                        threads(self.prefill_threads)
                        if len(group) > 1:
                            firsts: list[int | None] = list(self._prefill_group(rt, group, prefix))
                        else:
                            firsts = [self._prefill_chunk(rt, work[0], prefix)]
                    except Exception as exc:
                        self._failed(exc, work)
                        prefilling = [seq for seq in prefilling if seq not in work]
                        firsts = []
                    for seq, first in zip(work, firsts, strict=False):
                        if first is None:
                            continue
                        prefilling.remove(seq)
                        self._advance(rt, seq, first)
                        if seq.finish is None:
                            if batch is None:
                                batch = BatchCache(rt.device)
                            if running and not batchable(seq.cache):
                                # Sliding-window or other special caches cannot share a batch: this
                                # model decodes one sequence at a time.
                                self.max_batch = 1
                            batch.join(seq.cache, len(seq.job.prompt_ids))
                            seq.cache = None
                            running.append(seq)
                            if not batchable(batch.cache):
                                self.max_batch = 1
                        else:
                            self._end(seq)
                # 5. One decode step for every running sequence.
                if running and batch is not None:
                    try:
                        wide = self.wide_decode and big and len(running) >= WIDE_DECODE_ROWS
                        threads(self.prefill_threads if wide else self.decode_threads)
                        inputs = batch.step_inputs([seq.last for seq in running])
                        self.peak_kv_tokens = max(self.peak_kv_tokens, batch.rows * batch.length)
                        self.peak_batch = max(self.peak_batch, batch.rows)
                        logits = rt.forward(inputs, batch.cache)
                        tokens = rt.sample(logits, [seq.row for seq in running])
                        for i, seq in enumerate(running):
                            if seq.job.logprobs is not None:
                                seq.pending_logprobs += rt.logprob_entries(
                                    logits[i : i + 1], [tokens[i]], seq.job.logprobs
                                )
                    except Exception as exc:
                        self._failed(exc, running)
                        running, batch = [], None
                        continue
                    done: list[int] = []
                    for i, (seq, token) in enumerate(zip(running, tokens, strict=True)):
                        self._advance(rt, seq, token)
                        if seq.finish is not None:
                            done.append(i)
                            self._end(seq)
                            # What it holds (prompt and the tokens fed since) serves a next chat turn.
                            fed = [*seq.job.prompt_ids, *seq.generated[:-1]]
                            if prefix.max_tokens >= len(fed):
                                prefix.store(fed, batch.row_kv(i))
                    if done:
                        keep = [i for i in range(len(running)) if i not in done]
                        batch.keep(keep)
                        running = [running[i] for i in keep]
                        if not running:
                            batch = None
        # Unload: whatever is still here gets an answer rather than hanging.
        unloaded = EngineError(f"model {self._model_id} was unloaded")
        during = EngineError(f"model {self._model_id} was unloaded during generation")
        for seq in (*running, *prefilling):
            seq.job.send(during)
        for job in waiting:
            job.send(unloaded)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.send(unloaded)

    def _admit(self, rt: _Runtime, job: _Job, prefix: Any, *, whole_only: bool = False) -> _Seq:
        """`job` as a sequence about to prefill: its sampling state, and its cache (from the prefix cache
        when a recent sequence started the same way; only a whole-prompt hit with `whole_only`, for a
        prompt that will be prefilled in a group)."""
        from .sampling import RowState, new_generator  # noqa: PLC0415 -- lazy: imports torch

        max_new = completion_budget(
            n_prompt=len(job.prompt_ids),
            max_tokens=job.sampling.max_tokens,
            context_length=self._context_length,
        )
        row = RowState(
            sampling=job.sampling,
            generator=None if job.sampling.temperature == 0 else new_generator(rt.device, job.sampling.seed),
            prompt_ids=job.prompt_ids,
        )
        if job.sampling.constraint is not None:
            job.sampling.constraint.remaining(max_new)
        reused_cache, reused, first_logits = (
            (None, 0, None)
            if job.prompt_logprobs
            else prefix.take(job.prompt_ids, rt.model.config, whole_only=whole_only)
        )
        return _Seq(
            job=job,
            row=row,
            detok=_Detokenizer(rt.raw_tokenizer),
            stops=StopStringMatcher(job.sampling.stop),
            max_new=max_new,
            cache=reused_cache if reused_cache is not None else rt.new_cache(),
            prefilled=reused,
            first_logits=first_logits,
        )

    def _groupable(self, job: _Job) -> bool:
        """A prompt that may share a grouped prefill: one chunk long, no prompt logprobs (they need every
        position's logits), on a model that batches at all."""
        return (
            self.max_batch > 1
            and not job.prompt_logprobs
            and len(job.prompt_ids) <= self.prefill_chunk_tokens
        )

    def _joins_group(self, prefilling: list[_Seq], job: _Job) -> bool:
        """Whether `job` may be admitted now to be prefilled together with the already admitted ones:
        all fresh short prompts, the padded group within `PREFILL_GROUP_TOKENS`, and no prompt twice (a
        repeat, e.g. the choices of `n > 1`, waits a turn and then reuses the first one's KV)."""
        if not self._groupable(job) or len(prefilling) >= self.max_batch:
            return False
        if any(
            seq.prefilled or seq.first_logits is not None or not self._groupable(seq.job)
            for seq in prefilling
        ):
            return False
        if any(seq.job.prompt_ids == job.prompt_ids for seq in prefilling):
            return False
        longest = max([len(job.prompt_ids), *(len(seq.job.prompt_ids) for seq in prefilling)])
        return (len(prefilling) + 1) * longest <= PREFILL_GROUP_TOKENS

    def _group(self, prefilling: list[_Seq]) -> list[_Seq]:
        """The admitted sequences to prefill in one forward: the fresh short prompts at the front."""
        group: list[_Seq] = []
        for seq in prefilling:
            if seq.prefilled or seq.first_logits is not None or not self._groupable(seq.job):
                break
            group.append(seq)
        return group

    def _prefill_group(self, rt: _Runtime, seqs: list[_Seq], prefix: Any) -> list[int]:
        """Prefill several whole prompts in one left-padded forward (the weights are read once for all of
        them, and they start decoding together); give each its own unpadded cache, as a single prefill
        would, and return each one's first token."""
        import torch  # noqa: PLC0415 -- lazy: an idle agent must not import torch
        from transformers import DynamicCache  # noqa: PLC0415 -- lazy: transformers imports torch

        self.peak_prefill_group = max(self.peak_prefill_group, len(seqs))
        lengths = [len(seq.job.prompt_ids) for seq in seqs]
        width = max(lengths)
        ids = [[0] * (width - n) + list(seq.job.prompt_ids) for seq, n in zip(seqs, lengths, strict=True)]
        mask = torch.tensor(
            [[0] * (width - n) + [1] * n for n in lengths], dtype=torch.long, device=rt.device
        )
        inputs = {
            "input_ids": torch.tensor(ids, dtype=torch.long, device=rt.device),
            "attention_mask": mask,
            "position_ids": (mask.cumsum(dim=1) - 1).clamp(min=0),
        }
        cache = rt.new_cache()
        logits = rt.forward(inputs, cache)  # [G, V]: left padding makes the last position real in every row
        firsts: list[int] = []
        for r, (seq, n) in enumerate(zip(seqs, lengths, strict=True)):
            kv = [
                (
                    layer.keys[r : r + 1, :, width - n :, :].clone(),
                    layer.values[r : r + 1, :, width - n :, :].clone(),
                )
                for layer in cache.layers
            ]
            seq.cache = DynamicCache(ddp_cache_data=kv, config=rt.model.config)
            seq.prefilled = n
            row_logits = logits[r : r + 1]
            prefix.store(seq.job.prompt_ids, kv, row_logits)
            firsts.append(self._first_token(rt, seq, row_logits))
        return firsts

    def _fits(self, running: list[_Seq], job: _Job) -> bool:
        """Whether `job` may start now: always when nothing runs; else within the batch size and the KV
        budget, counted as padded rows (rows x the longest possible sequence)."""
        if not running:
            return True
        if len(running) + 1 > self.max_batch:
            return False
        if self.kv_budget_tokens is None:
            return True
        budget = self.kv_budget_tokens - self._prefix_tokens()
        reserve = len(job.prompt_ids) + completion_budget(
            n_prompt=len(job.prompt_ids),
            max_tokens=job.sampling.max_tokens,
            context_length=self._context_length,
        )
        longest = max([reserve, *(seq.reserve for seq in running)])
        return (len(running) + 1) * longest <= budget

    def _prefill_chunk(self, rt: _Runtime, seq: _Seq, prefix: Any) -> int | None:
        """Feed the next chunk of `seq`'s prompt into its cache; return its first token once the whole
        prompt is in (None before). A prompt found whole in the prefix cache needs no forward pass."""
        import torch  # noqa: PLC0415 -- lazy: an idle agent must not import torch

        job = seq.job
        ids = job.prompt_ids
        if seq.first_logits is not None:
            return self._first_token(rt, seq, seq.first_logits)
        chunk = ids[seq.prefilled : seq.prefilled + self.prefill_chunk_tokens]
        inputs = {"input_ids": torch.tensor([chunk], device=rt.device)}
        if job.prompt_logprobs:
            if seq.prefilled == 0:  # nothing predicts the first token: its logprob is NaN (JSON null)
                first = TokenLogprob(token_id=ids[0], text=rt.token_text(ids[0]), logprob=math.nan)
                seq.prompt_logprobs.append(first)
            every = rt.forward_all(inputs, seq.cache)  # [n, V]: position j predicts prompt token j + 1
            nxt = ids[seq.prefilled + 1 : seq.prefilled + len(chunk) + 1]
            if nxt:
                top = job.logprobs or 0
                seq.prompt_logprobs += rt.logprob_entries(every[: len(nxt)], nxt, top)
            logits = every[-1:]
        else:
            logits = rt.forward(inputs, seq.cache)
        seq.prefilled += len(chunk)
        if seq.prefilled < len(ids):
            return None
        # The prompt's KV (shared, never written in place) and last logits: `n > 1`, retries and
        # repeated prompts start from here.
        prefix.store(ids, [(layer.keys, layer.values) for layer in seq.cache.layers], logits)
        return self._first_token(rt, seq, logits)

    def _first_token(self, rt: _Runtime, seq: _Seq, logits: Any) -> int:
        token = rt.sample(logits, [seq.row])[0]
        if seq.job.logprobs is not None:
            seq.pending_logprobs += rt.logprob_entries(logits, [token], seq.job.logprobs)
        return token

    def _prefix_tokens(self) -> int:
        """KV positions the prefix cache may keep: a quarter of the budget (the batch gets the rest)."""
        if self.kv_budget_tokens is None or not self.prefix_reuse:
            return 0
        return self.kv_budget_tokens // PREFIX_CACHE_DIVISOR

    def _advance(self, rt: _Runtime, seq: _Seq, token: int) -> None:
        """`token` was chosen for `seq`: emit its text, decide whether the sequence ends."""
        seq.completion += 1
        seq.generated.append(token)
        seq.row.accept(token)
        sampling = seq.job.sampling
        if (token in rt.eos_ids and not sampling.ignore_eos) or token in sampling.stop_token_ids:
            seq.finish = "stop"
            return
        text = seq.detok.step(token)
        if text:
            out, stopped = seq.stops.feed(text)
            if out:
                seq.job.send(Delta(text=out, logprobs=self._take_logprobs(seq)))
            if stopped:
                seq.finish, seq.stopped = "stop", True
                return
        constraint = sampling.constraint
        if constraint is not None and constraint.done:
            seq.finish = "stop"
        elif seq.completion >= seq.max_new:
            seq.finish = "length"
        else:
            seq.last = token
            if constraint is not None:
                constraint.remaining(seq.max_new - seq.completion)

    def _end(self, seq: _Seq) -> None:
        """Flush what the detokenizer and the stop matcher held back; send the `Final`."""
        finish = seq.finish or "length"
        if not seq.stopped:
            tail = seq.detok.flush()
            if tail:
                out, stopped = seq.stops.feed(tail)
                if out:
                    seq.job.send(Delta(text=out, logprobs=self._take_logprobs(seq)))
                if stopped:
                    finish = "stop"
                    seq.stopped = True
            if not seq.stopped:
                rest = seq.stops.flush()
                if rest:
                    seq.job.send(Delta(text=rest, logprobs=self._take_logprobs(seq)))
        usage = Usage(prompt_tokens=len(seq.job.prompt_ids), completion_tokens=seq.completion)
        seq.job.send(
            Final(
                usage=usage,
                finish_reason=finish,
                logprobs=self._take_logprobs(seq),
                prompt_logprobs=tuple(seq.prompt_logprobs),
            )
        )

    @staticmethod
    def _take_logprobs(seq: _Seq) -> tuple[TokenLogprob, ...]:
        out = tuple(seq.pending_logprobs)
        seq.pending_logprobs.clear()
        return out

    def _finish_cancelled(self, job: _Job, *, completion: int) -> None:
        if job.cancel_reason == "unload":
            job.send(EngineError(f"model {self._model_id} was unloaded during generation"))
            return
        job.send(
            Final(
                usage=Usage(prompt_tokens=len(job.prompt_ids), completion_tokens=completion),
                finish_reason="stop",
            )
        )

    def _failed(self, exc: Exception, seqs: list[_Seq]) -> None:
        """A forward pass or sampling failed for `seqs`: a device fault poisons the model, anything
        else fails just these requests."""
        if is_device_fault(exc):
            self._fault = f"{type(exc).__name__}: {exc}"
            log.error("model %s faulted during generation: %s", self._model_id, exc)
            error: EngineError = EngineFault(f"model {self._model_id} failed: {exc}")
        else:
            log.exception("generation failed on %s", self._model_id, exc_info=exc)
            error = EngineError(f"generation failed: {type(exc).__name__}: {exc}")
        for seq in seqs:
            seq.job.send(error)


# Fill-in-the-middle tokens, in prefix-suffix-middle order, as the code models' tokenizers spell them.
_FIM_TOKENS = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder, DeepSeek-style
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, SantaCoder
    ("<PRE>", "<SUF>", "<MID>"),  # Code Llama
)


def _fim_ids(model_id: str, tokenizer: Any, prefix: str, suffix: str) -> list[int]:
    """The prefix-suffix-middle prompt of a fill-in-the-middle request, with the tokenizer's own FIM
    tokens; a tokenizer without them cannot: a `RequestError` naming `suffix`."""
    vocab = tokenizer.get_vocab()
    for names in _FIM_TOKENS:
        if all(name in vocab for name in names):
            pre, suf, mid = (int(vocab[name]) for name in names)
            encode = tokenizer.encode
            return [
                pre,
                *encode(prefix, add_special_tokens=False),
                suf,
                *encode(suffix, add_special_tokens=False),
                mid,
            ]
    raise RequestError(
        f"model {model_id} has no fill-in-the-middle tokens, so 'suffix' cannot be used with it",
        param="suffix",
    )


def _template_tools(request: GenerationRequest) -> list[dict[str, Any]] | None:
    """The request's tools in the form chat templates take, or None (no tools, or `tool_choice` "none")."""
    if not request.tools or request.tool_choice == "none":
        return None
    out: list[dict[str, Any]] = []
    for tool in request.tools:
        function: dict[str, Any] = {"name": tool.name, "parameters": tool.parameters or {"type": "object"}}
        if tool.description:
            function["description"] = tool.description
        out.append({"type": "function", "function": function})
    return out


def _template_turn(message: ChatMessage) -> dict[str, Any]:
    """One message as chat templates read it (tool calls with their arguments as objects)."""
    turn: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role}
    turn["content"] = message.content
    if message.name:
        turn["name"] = message.name
    if message.tool_calls:
        calls = []
        for call in message.tool_calls:
            try:
                arguments: Any = json.loads(call.arguments)
            except ValueError:
                arguments = call.arguments
            calls.append(
                {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": arguments}}
            )
        turn["tool_calls"] = calls
    if message.tool_call_id:
        turn["tool_call_id"] = message.tool_call_id
    return turn


def _threads_setting(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    if value:
        log.warning("ignoring %s=%r (a positive number of threads)", name, value)
    return default


def in_own_thread(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """Run a long blocking call (a download, a load, a join) in a fresh daemon thread.

    Not `asyncio.to_thread`: the default executor has a handful of threads, and several slow loads
    parked there would delay the short tokenisation calls that requests to other models make.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                loop.call_soon_threadsafe(settle, None, exc)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(
        target=target, name=f"helexa-engine:{getattr(fn, '__name__', 'call')}", daemon=True
    ).start()
    return future


def _release_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch  # noqa: PLC0415 -- lazy: an idle agent must not import torch

        torch.cuda.empty_cache()


def _rss_bytes() -> int:
    return int(psutil.Process(os.getpid()).memory_info().rss)


# -- loading ---------------------------------------------------------------------------------------


class TransformersEngine:
    """Loads causal LMs with transformers onto one device (`cpu` or `cuda:N`). Implements `Engine`."""

    @property
    def name(self) -> EngineName:
        return "transformers"

    async def load(self, spec: LoadSpec, progress: ProgressCallback | None = None) -> TransformersModel:
        if spec.task != "generate":
            # `engine.registry.create_engine("transformers", "embed")` gives `engine.embeddings`' engine.
            raise ModelSourceError(f"{spec.model_id} is an embedding model: load it with EmbeddingEngine")
        loop = asyncio.get_running_loop()

        def report(p: LoadProgress) -> None:
            if progress is not None:
                loop.call_soon_threadsafe(progress, p)

        report(LoadProgress(phase="resolving", fraction=None))
        path = await in_own_thread(resolve_source, spec, report)
        model = await in_own_thread(_load_blocking, spec, path, report)
        log.info(
            "loaded %s from %s on %s (%d MB, context %d)",
            spec.model_id,
            path,
            spec.devices[0],
            model.memory.total_mb,
            model.context_length,
        )
        return model


def _check_device(device: str) -> None:
    import torch  # noqa: PLC0415 -- lazy: an idle agent must not import torch

    if device == "cpu":
        return
    if device.startswith("cuda:") and device[5:].isdigit():
        if not torch.cuda.is_available():
            raise LoadError(f"device {device} requested but CUDA is not available")
        if int(device[5:]) >= torch.cuda.device_count():
            raise LoadError(f"device {device} does not exist ({torch.cuda.device_count()} CUDA devices)")
        return
    raise LoadError(f"unsupported device {device!r} (use 'cpu' or 'cuda:N')")


def _memory_now(device: str) -> int:
    if device.startswith("cuda"):
        import torch  # noqa: PLC0415 -- lazy: an idle agent must not import torch

        torch.cuda.synchronize(device)
        return int(torch.cuda.memory_reserved(device))
    return _rss_bytes()


def _load_blocking(spec: LoadSpec, path: Path, report: ProgressCallback) -> TransformersModel:
    import torch  # noqa: PLC0415 -- lazy: an idle agent must not import torch
    import transformers  # noqa: PLC0415 -- lazy, like torch

    # transformers' own annotations are partial; treat it as untyped at this boundary.
    tf: Any = transformers
    tf.utils.logging.disable_progress_bar()
    if len(spec.devices) != 1:
        raise LoadError(
            f"the transformers engine runs a model on exactly one device, got {list(spec.devices)} "
            "(tensor parallel needs the mlc engine)"
        )
    device = spec.devices[0]
    _check_device(device)
    if spec.quant is None:
        dtype: Any = torch.float32 if device == "cpu" else "auto"
    elif spec.quant in DTYPES:
        dtype = getattr(torch, DTYPES[spec.quant])
    else:
        raise ModelSourceError(
            f"quant {spec.quant!r} is not supported by the transformers engine (use one of {sorted(DTYPES)})"
        )
    report(LoadProgress(phase="loading", fraction=None))
    with _MEASURE_LOCK:
        try:
            tokenizer = tf.AutoTokenizer.from_pretrained(str(path))
            config = tf.AutoConfig.from_pretrained(str(path))
            # Import the model's code before measuring, so the first model is not charged for it.
            tf.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelSourceError(f"cannot load {spec.model_id} from {path}: {exc}") from exc
        before = _memory_now(device)
        try:
            model = tf.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
            model.to(device)
            model.eval()
        except torch.OutOfMemoryError as exc:
            raise InsufficientMemory(f"{spec.model_id} does not fit on {device}: {exc}") from exc
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelSourceError(f"cannot load {spec.model_id} from {path}: {exc}") from exc
        if getattr(tokenizer, "backend_tokenizer", None) is None:
            raise ModelSourceError(f"{path}: the engine needs a fast (tokenizers) tokenizer")
        runtime = _Runtime(
            model=model,
            tokenizer=tokenizer,
            device=device,
            eos_ids=_eos_ids(model, tokenizer),
            vocab_limit=min(len(tokenizer), int(model.config.get_text_config().vocab_size)),
        )
        context_length = _context_length(spec, model, tokenizer)
        report(LoadProgress(phase="warming", fraction=None))
        try:
            _warm_up(runtime)
        except torch.OutOfMemoryError as exc:
            raise InsufficientMemory(f"{spec.model_id} does not fit on {device}: {exc}") from exc
        after = _memory_now(device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    used_mb = math.ceil(max(after - before, weights) / 2**20)
    return TransformersModel(
        model_id=spec.model_id,
        runtime=runtime,
        context_length=context_length,
        memory=MemoryReport(per_device_mb={device: used_mb}),
        kv_budget_tokens=_kv_budget_tokens(spec, model, used_mb),
    )


def _kv_budget_tokens(spec: LoadSpec, model: Any, used_mb: int) -> int:
    """KV positions the batch may hold: what the catalogue's `memory_mb` leaves after the weights
    (`DEFAULT_KV_BUDGET_MB` when it gives none). Never below one full context: a single request always
    runs (the budget bounds how many run together, it never refuses one)."""
    from .kvbatch import kv_bytes_per_token  # noqa: PLC0415 -- lazy: imports torch

    per_token = kv_bytes_per_token(model.config, next(model.parameters()).dtype)
    budget_mb = spec.memory_mb - used_mb if spec.memory_mb else DEFAULT_KV_BUDGET_MB
    tokens = max(0, budget_mb) * 2**20 // per_token
    return max(int(tokens), model.config.get_text_config().max_position_embeddings or 0, 1)


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for value in (
        getattr(model.generation_config, "eos_token_id", None),
        getattr(model.config, "eos_token_id", None),
        tokenizer.eos_token_id,
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def _context_length(spec: LoadSpec, model: Any, tokenizer: Any) -> int:
    config = model.config.get_text_config()
    known = [
        n
        for n in (getattr(config, "max_position_embeddings", None), spec.context_length)
        if isinstance(n, int) and n > 0
    ]
    if known:
        return min(known)
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < 10_000_000:
        return model_max
    return _DEFAULT_CONTEXT_LENGTH


def _warm_up(rt: _Runtime) -> None:
    """Two greedy tokens through prefill and decode, so the first request pays no first-call costs."""
    import torch  # noqa: PLC0415 -- lazy: an idle agent must not import torch

    with torch.inference_mode():
        ids = rt.tokenizer.encode("Hello", add_special_tokens=True) or [0]
        cache = rt.new_cache()
        logits = rt.forward({"input_ids": torch.tensor([ids], device=rt.device)}, cache)
        token = int(torch.argmax(logits[0]).item())
        rt.forward({"input_ids": torch.tensor([[token]], device=rt.device)}, cache)
