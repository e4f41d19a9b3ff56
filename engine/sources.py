"""Where a model's files are: a catalogue `source` resolved to a local directory the engines can open.

- a local directory is used as it is;
- `org/name` (a Hugging Face repo id) is fetched into the HF cache by `download.fetch_snapshot`;
- `HF://org/name` names MLC weights, which only the mlc engine loads.

Runs in a loader thread (file I/O, downloads): never on the event loop.
"""

from __future__ import annotations

import os
from pathlib import Path

from .base import LoadSpec, ProgressCallback
from .download import fetch_snapshot
from .errors import ModelSourceError

# Files a causal LM needs from a hub snapshot (weights, configs, tokenizer, chat template).
HF_ALLOW_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.tiktoken", "*.txt")


def _looks_local(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or os.sep + os.sep in source or Path(source).exists()


def resolve_source(spec: LoadSpec, report: ProgressCallback) -> Path:
    """A local model directory for `spec.source`: the directory itself, or a hub snapshot downloaded
    into the HF cache (`spec.cache_dir`, else the default). Structural problems raise
    `ModelSourceError`; network problems raise `TransientLoadError` (the caller may retry)."""
    source = spec.source
    if source.startswith("HF://"):
        raise ModelSourceError(f"{source} names MLC weights, which only the mlc engine can load")
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
