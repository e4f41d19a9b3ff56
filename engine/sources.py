"""Where a model's files are: a catalogue `source` resolved to a local directory the engines can open.

- a local directory is used as it is;
- `org/name` (a Hugging Face repo id) is fetched into the HF cache by `download.fetch_snapshot`;
- `/path/model.gguf` or `org/name:model.gguf` names a GGUF file (local, or one file of a hub repo): it is
  converted once into a model directory in the GGUF cache (`engine.gguf`), which is what the engine loads;
- `HF://org/name` names MLC weights, which only the mlc engine loads.

Runs in a loader thread (file I/O, downloads): never on the event loop.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import download
from .base import LoadSpec, ProgressCallback
from .download import fetch_snapshot
from .errors import ModelSourceError
from .gguf import DEFAULT_CACHE_MB, cached_model_dir, is_gguf_source, split_hub_gguf

# Files a causal LM needs from a hub snapshot (weights, configs, tokenizer, chat template).
HF_ALLOW_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.tiktoken", "*.txt")
# The dtypes a catalogue `quant` may name for the transformers engines (their torch names).
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def _looks_local(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or os.sep + os.sep in source or Path(source).exists()


def resolve_source(spec: LoadSpec, report: ProgressCallback) -> Path:
    """A local model directory for `spec.source`: the directory itself, or a hub snapshot downloaded
    into the HF cache (`spec.cache_dir`, else the default). Structural problems raise
    `ModelSourceError`; network problems raise `TransientLoadError` (the caller may retry)."""
    source = spec.source
    if source.startswith("HF://"):
        raise ModelSourceError(f"{source} names MLC weights, which only the mlc engine can load")
    if is_gguf_source(source):
        return _gguf_model_dir(spec, report)
    if _looks_local(source):
        path = Path(source).expanduser()
        if not path.is_dir():
            raise ModelSourceError(f"model directory {path} does not exist")
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path} has no config.json (not a transformers model directory)")
        return path
    if source.count("/") != 1:
        raise ModelSourceError(f"source {source!r} is neither a local directory nor a repo id (org/name)")
    return fetch_snapshot(
        spec.source,
        revision=spec.revision,
        cache_dir=spec.cache_dir,
        allow_patterns=HF_ALLOW_PATTERNS,
        report=report,
    )


def default_gguf_cache() -> Path:
    """Where converted GGUF files go when the spec names no cache (an engine used outside an agent)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "helexa" / "gguf"


def gguf_dtype(spec: LoadSpec) -> str:
    """The dtype a GGUF file is dequantized to: the entry's `quant` when it names one, else float32 on
    a CPU (what its kernels are fastest at) and float16 on a GPU."""
    if spec.quant is not None:
        if spec.quant not in DTYPES:
            raise ModelSourceError(
                f"quant {spec.quant!r} cannot be applied to a GGUF file (use one of {sorted(DTYPES)}, "
                "or leave it out: the file's own quantization is dequantized)"
            )
        return DTYPES[spec.quant]
    return "float32" if spec.devices[0] == "cpu" else "float16"


def _gguf_model_dir(spec: LoadSpec, report: ProgressCallback) -> Path:
    if spec.task != "generate":
        raise ModelSourceError(f"{spec.source}: GGUF sources are read as chat/completion models only")
    hub = split_hub_gguf(spec.source)
    if hub is not None and not _looks_local(spec.source):
        repo, filename = hub
        gguf_file = download.fetch_file(
            repo, filename, revision=spec.revision, cache_dir=spec.cache_dir, report=report
        )
    else:
        gguf_file = Path(spec.source).expanduser()
        if not gguf_file.is_file():
            raise ModelSourceError(f"GGUF file {gguf_file} does not exist")
    return cached_model_dir(
        gguf_file,
        cache_dir=spec.gguf_cache_dir or default_gguf_cache(),
        dtype=gguf_dtype(spec),
        limit_mb=spec.gguf_cache_mb or DEFAULT_CACHE_MB,
        report=report,
    )
