"""Encoder and embedding models on transformers: `EmbeddingEngine` loads a `LoadSpec` whose task is `embed`.

The model is loaded with `AutoModel` (no LM head) and its token states are pooled as the model's
sentence-transformers configuration says: `modules.json` names a `Pooling` module (its `config.json`
picks CLS, mean, max, mean-sqrt-len or last-token pooling) and optionally `Normalize`. A model directory
without `modules.json` gets mean pooling and L2 normalisation (what most embedding servers do). Other
sentence-transformers modules (Dense layers, ...) are refused at load rather than silently skipped.

Inputs are texts or token ids; both get the tokenizer's special tokens (CLS/SEP, EOS) the same way, so a
text and its token ids embed alike. Each input must fit the model's context (`ContextLengthExceeded`
naming `input`); inputs are sorted by length and run in batches bounded by rows and padded tokens, in a
worker thread (one batch on the model at a time). `dimensions` truncates and renormalises for Matryoshka
models (`matryoshka_dimensions` in the model's config.json, or `options.matryoshka = true` in the
catalogue); any other model refuses a size other than its own with a `RequestError` naming `dimensions`.

torch and transformers are imported only inside the load and the worker threads, never at import.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .base import (
    Embeddings,
    EmbedInput,
    EngineName,
    GenerationEvent,
    GenerationRequest,
    LoadProgress,
    LoadSpec,
    MemoryReport,
    ModelId,
    ProgressCallback,
    RequestId,
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
from .streaming import check_usable
from .transformers_engine import (
    _MEASURE_LOCK,
    _check_device,
    _memory_now,
    in_own_thread,
    is_device_fault,
)

log = logging.getLogger(__name__)

__all__ = ["EmbeddingEngine", "Pooling", "TransformersEmbeddingModel", "read_pooling"]

PoolingMode = Literal["mean", "cls", "max", "mean_sqrt_len", "lasttoken"]

# Rows per forward pass at most, and padded tokens per forward pass at most (a batch of long inputs
# gets fewer rows): bounds the activation memory of one batch whatever the request holds.
MAX_BATCH_ROWS = 32
MAX_BATCH_TOKENS = 8192
# sentence-transformers module types the engine implements (the Transformer itself is the model).
_ST_TRANSFORMER = "sentence_transformers.models.Transformer"
_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"
# `1_Pooling/config.json` flags, in the order sentence-transformers reads them.
_POOLING_FLAGS: dict[str, PoolingMode] = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass(frozen=True, kw_only=True, slots=True)
class Pooling:
    """How token states become one vector."""

    mode: PoolingMode = "mean"
    normalize: bool = True


def read_pooling(path: Path) -> Pooling:
    """The pooling a model directory declares (see the module docstring); `ModelSourceError` for a
    configuration the engine cannot follow."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return Pooling()
    try:
        modules = json.loads(modules_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"{modules_file}: {exc}") from exc
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ModelSourceError(f"{modules_file}: expected a list of modules")
    mode: PoolingMode | None = None
    normalize = False
    for module in modules:
        kind = module.get("type")
        if kind == _ST_TRANSFORMER:
            continue
        if kind == _ST_NORMALIZE:
            normalize = True
        elif kind == _ST_POOLING:
            mode = _pooling_mode(path / str(module.get("path", "")) / "config.json")
        else:
            raise ModelSourceError(f"{modules_file}: the module {kind!r} is not supported by the engine")
    return Pooling(mode=mode or "mean", normalize=normalize)


def _pooling_mode(config_file: Path) -> PoolingMode:
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"{config_file}: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelSourceError(f"{config_file}: expected an object")
    modes = [mode for flag, mode in _POOLING_FLAGS.items() if config.get(flag)]
    if len(modes) != 1:
        raise ModelSourceError(
            f"{config_file}: the engine pools with exactly one mode, the config sets {modes or 'none'}"
        )
    return modes[0]


class TransformersEmbeddingModel:
    """A loaded encoder. Implements `EmbeddingModel` (and `LoadedModel`: its `generate` refuses)."""

    def __init__(
        self,
        *,
        model_id: ModelId,
        model: Any,
        tokenizer: Any,
        device: str,
        pooling: Pooling,
        context_length: int,
        memory: MemoryReport,
        matryoshka: bool,
    ) -> None:
        self._model_id = model_id
        self._model: Any = model
        self._tokenizer: Any = tokenizer
        self._device = device
        self._pooling = pooling
        self._context_length = context_length
        self._memory = memory
        self._matryoshka = matryoshka
        self._prefix, self._suffix = _special_affixes(tokenizer)
        self._pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self._vocab = len(tokenizer)
        self._dimensions = int(model.config.hidden_size)
        # One batch on the model at a time (the worker threads queue here); `_pending` counts requests.
        self._run = threading.Lock()
        self._pending = 0
        self.fault: str | None = None
        self.unloaded = False

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
        return max(0, self._pending - 1)

    @property
    def dimensions(self) -> int:
        return self._dimensions

    @property
    def pooling(self) -> Pooling:
        return self._pooling

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        raise RequestError(
            f"the model '{self._model_id}' is an embedding model: it has no text to generate", param="model"
        )
        yield  # an async generator, like every engine's generate

    async def abort(self, request_id: RequestId) -> None:
        return None  # an embedding request is one short batch; nothing to stop

    async def unload(self) -> None:
        if self.unloaded:
            return
        self.unloaded = True
        await asyncio.to_thread(self._free)

    def _free(self) -> None:
        with self._run:
            self._model = None
        _release(self._device)

    async def embed(self, inputs: tuple[EmbedInput, ...], *, dimensions: int | None = None) -> Embeddings:
        check_usable(self._model_id, fault=self.fault, unloaded=self.unloaded)
        if dimensions is not None and dimensions != self._dimensions:
            if not self._matryoshka:
                raise RequestError(
                    f"the model '{self._model_id}' has {self._dimensions} dimensions and was not trained "
                    "for shorter vectors; leave 'dimensions' out",
                    param="dimensions",
                )
            if not 1 <= dimensions <= self._dimensions:
                raise RequestError(
                    f"'dimensions' must be between 1 and {self._dimensions} for '{self._model_id}'",
                    param="dimensions",
                )
        if not inputs:
            raise RequestError("'input' must not be empty", param="input")
        ids = await asyncio.to_thread(self._tokenize, inputs)
        self._pending += 1  # on the loop only; the running one is not waiting
        try:
            vectors = await asyncio.to_thread(self._embed_blocking, ids, dimensions)
        finally:
            self._pending -= 1
        return Embeddings(vectors=tuple(tuple(v) for v in vectors), prompt_tokens=sum(len(i) for i in ids))

    # -- off the loop -------------------------------------------------------------------------------

    def _tokenize(self, inputs: tuple[EmbedInput, ...]) -> list[list[int]]:
        out: list[list[int]] = []
        for n, item in enumerate(inputs):
            where = f"input[{n}]" if len(inputs) > 1 else "input"
            if isinstance(item, str):
                body = list(self._tokenizer.encode(item, add_special_tokens=False))
            else:
                bad = next((t for t in item if not 0 <= t < self._vocab), None)
                if bad is not None:
                    raise RequestError(
                        f"{where} holds the token id {bad}, outside this model's vocabulary "
                        f"(0..{self._vocab - 1})",
                        param="input",
                    )
                body = list(item)
            ids = [*self._prefix, *body, *self._suffix]
            if len(ids) > self._context_length:
                raise ContextLengthExceeded(
                    f"{where} is {len(ids)} tokens, more than this model's context length "
                    f"({self._context_length} tokens)",
                    param="input",
                )
            out.append(ids)
        return out

    def _embed_blocking(self, ids: list[list[int]], dimensions: int | None) -> list[list[float]]:
        import torch  # noqa: PLC0415 -- lazy: an idle agent must not import torch

        vectors: list[list[float]] = [[] for _ in ids]
        try:
            with self._run, torch.inference_mode():
                if self._model is None:
                    raise EngineError(f"model {self._model_id} was unloaded")
                check_usable(self._model_id, fault=self.fault, unloaded=self.unloaded)
                for batch in _batches(ids):
                    pooled = self._forward([ids[i] for i in batch])
                    if dimensions is not None and dimensions < pooled.shape[1]:
                        pooled = pooled[:, :dimensions]
                        if self._pooling.normalize:
                            pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
                    for row, i in zip(pooled.float().cpu().tolist(), batch, strict=True):
                        vectors[i] = row
        except Exception as exc:
            if is_device_fault(exc):
                self.fault = f"{type(exc).__name__}: {exc}"
                raise EngineFault(f"model {self._model_id} failed: {self.fault}") from exc
            if isinstance(exc, torch.OutOfMemoryError):
                raise EngineError(f"{self._model_id} ran out of memory embedding this batch") from exc
            raise
        return vectors

    def _forward(self, rows: list[list[int]]) -> Any:
        import torch  # noqa: PLC0415 -- lazy: an idle agent must not import torch

        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for n, row in enumerate(rows):
            input_ids[n, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[n, : len(row)] = 1
        input_ids, mask = input_ids.to(self._device), mask.to(self._device)
        states = self._model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        pooled = _pool(states, mask, self._pooling.mode)
        if self._pooling.normalize:
            pooled = torch.nn.functional.normalize(pooled.float(), p=2.0, dim=1)
        return pooled


def _pool(states: Any, mask: Any, mode: PoolingMode) -> Any:
    """One vector per row of `states` (batch, tokens, hidden) over the tokens `mask` keeps (right-padded)."""
    import torch  # noqa: PLC0415 -- lazy: an idle agent must not import torch

    states = states.float()
    if mode == "cls":
        return states[:, 0]
    lengths = mask.sum(dim=1)
    if mode == "lasttoken":
        return states[torch.arange(states.shape[0], device=states.device), lengths - 1]
    keep = mask.unsqueeze(-1).to(states.dtype)
    if mode == "max":
        return states.masked_fill(keep == 0, float("-inf")).max(dim=1).values
    total = (states * keep).sum(dim=1)
    count = lengths.unsqueeze(-1).to(states.dtype).clamp(min=1.0)
    return total / (count.sqrt() if mode == "mean_sqrt_len" else count)


def _batches(ids: list[list[int]]) -> list[list[int]]:
    """Indices of `ids` grouped into batches of similar length, bounded by rows and padded tokens."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = len(ids[i])  # sorted: the longest so far
        if current and (len(current) >= MAX_BATCH_ROWS or (len(current) + 1) * width > MAX_BATCH_TOKENS):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (BERT: [CLS] ... [SEP])."""
    plain = list(tokenizer.encode("a", add_special_tokens=False))
    full = list(tokenizer.encode("a", add_special_tokens=True))
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


def _release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch  # noqa: PLC0415 -- lazy: an idle agent must not import torch

        torch.cuda.empty_cache()


class EmbeddingEngine:
    """Loads encoders and embedding models with transformers onto one device. Implements `Engine`."""

    @property
    def name(self) -> EngineName:
        return "transformers"

    async def load(
        self, spec: LoadSpec, progress: ProgressCallback | None = None
    ) -> TransformersEmbeddingModel:
        loop = asyncio.get_running_loop()

        def report(p: LoadProgress) -> None:
            if progress is not None:
                loop.call_soon_threadsafe(progress, p)

        report(LoadProgress(phase="resolving", fraction=None))
        path = await in_own_thread(resolve_source, spec, report)
        model = await in_own_thread(_load_blocking, spec, path, report)
        log.info(
            "loaded embedding model %s from %s on %s (%d MB, %d dimensions, %s pooling)",
            spec.model_id,
            path,
            spec.devices[0],
            model.memory.total_mb,
            model.dimensions,
            model.pooling.mode,
        )
        return model


def _load_blocking(spec: LoadSpec, path: Path, report: ProgressCallback) -> TransformersEmbeddingModel:
    import torch  # noqa: PLC0415 -- lazy: an idle agent must not import torch
    import transformers  # noqa: PLC0415 -- lazy, like torch

    tf: Any = transformers  # partially annotated; untyped at this boundary
    tf.utils.logging.disable_progress_bar()
    if len(spec.devices) != 1:
        raise LoadError(f"an embedding model runs on exactly one device, got {list(spec.devices)}")
    device = spec.devices[0]
    _check_device(device)
    if spec.quant is None:
        dtype: Any = torch.float32 if device == "cpu" else "auto"
    elif spec.quant in DTYPES:
        dtype = getattr(torch, DTYPES[spec.quant])
    else:
        raise ModelSourceError(f"quant {spec.quant!r} is not supported (use one of {sorted(DTYPES)})")
    pooling = read_pooling(path)
    report(LoadProgress(phase="loading", fraction=None))
    with _MEASURE_LOCK:
        try:
            tokenizer = tf.AutoTokenizer.from_pretrained(str(path))
            config = tf.AutoConfig.from_pretrained(str(path))
            tf.MODEL_MAPPING[type(config)]  # import the model's code before measuring
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelSourceError(f"cannot load {spec.model_id} from {path}: {exc}") from exc
        before = _memory_now(device)
        try:
            model = tf.AutoModel.from_pretrained(str(path), dtype=dtype)
            model.to(device)
            model.eval()
        except torch.OutOfMemoryError as exc:
            raise InsufficientMemory(f"{spec.model_id} does not fit on {device}: {exc}") from exc
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelSourceError(f"cannot load {spec.model_id} from {path}: {exc}") from exc
        loaded = TransformersEmbeddingModel(
            model_id=spec.model_id,
            model=model,
            tokenizer=tokenizer,
            device=device,
            pooling=pooling,
            context_length=_context_length(spec, config, tokenizer),
            memory=MemoryReport(per_device_mb={device: 0}),
            matryoshka=bool(spec.options.get("matryoshka"))
            or bool(getattr(config, "matryoshka_dimensions", None)),
        )
        report(LoadProgress(phase="warming", fraction=None))
        try:
            loaded._embed_blocking(loaded._tokenize(("Hello",)), None)
        except torch.OutOfMemoryError as exc:
            raise InsufficientMemory(f"{spec.model_id} does not fit on {device}: {exc}") from exc
        after = _memory_now(device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    loaded._memory = MemoryReport(per_device_mb={device: math.ceil(max(after - before, weights) / 2**20)})
    return loaded


def _context_length(spec: LoadSpec, config: Any, tokenizer: Any) -> int:
    """The longest input: the smallest of the catalogue's, the config's and the tokenizer's limits (RoBERTa
    configs count two extra positions the tokenizer's limit leaves out)."""
    limits = [
        n
        for n in (
            getattr(config, "max_position_embeddings", None),
            spec.context_length,
            getattr(tokenizer, "model_max_length", None),
        )
        if isinstance(n, int) and 0 < n < 10_000_000
    ]
    return min(limits) if limits else 512
