"""Choosing and creating engines. Cheap to import: engine modules are imported on demand.

MISSION's `auto` rule: the mlc engine when `mlc_llm` is importable, the host has CUDA GPUs and the
entry names MLC weights (`HF://org/name`, or a directory holding `mlc-chat-config.json`); otherwise
transformers. `fake` is used only when an entry asks for it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import get_args

from .base import Engine, EngineName, ModelTask
from .probe import mlc_available

__all__ = ["ENGINE_NAMES", "choose_engine", "create_engine", "is_mlc_source", "mlc_available"]

log = logging.getLogger(__name__)

ENGINE_NAMES: tuple[EngineName, ...] = get_args(EngineName)


def create_engine(name: EngineName, task: ModelTask = "generate") -> Engine:
    """A new engine instance by name (and task: embedding models have their own transformers engine);
    the engine's module is imported only now."""
    # Lazy on purpose: an agent imports only the engines its catalogue uses (this module stays cheap).
    if name == "transformers" and task == "embed":
        from .embeddings import EmbeddingEngine  # noqa: PLC0415

        return EmbeddingEngine()
    if name == "transformers":
        from .transformers_engine import TransformersEngine  # noqa: PLC0415

        return TransformersEngine()
    if name == "mlc":
        from .mlc_engine import MLCEngine  # noqa: PLC0415

        return MLCEngine()
    if name == "fake":
        from .fake import FakeEngine  # noqa: PLC0415

        return FakeEngine()
    raise ValueError(f"unknown engine {name!r} (known: {', '.join(ENGINE_NAMES)})")


def is_mlc_source(source: str) -> bool:
    """True for MLC weights: an `HF://` repo, or a local directory with `mlc-chat-config.json`."""
    if source.startswith("HF://"):
        return True
    try:
        return (Path(source).expanduser() / "mlc-chat-config.json").is_file()
    except OSError:
        return False


def choose_engine(
    entry_engine: str, source: str, has_cuda: bool, *, mlc_importable: bool | None = None
) -> EngineName:
    """The engine for a catalogue entry: an explicit choice wins; `auto` applies MISSION's rule.

    `mlc_importable` overrides the `mlc_available()` probe (tests).
    """
    if entry_engine in ENGINE_NAMES:
        return entry_engine
    if entry_engine != "auto":
        raise ValueError(f"unknown engine {entry_engine!r} (use auto, {', '.join(ENGINE_NAMES)})")
    if has_cuda and is_mlc_source(source):
        importable = mlc_available() if mlc_importable is None else mlc_importable
        if importable:
            return "mlc"
        log.debug("%s names MLC weights but mlc_llm is not importable; using transformers", source)
    return "transformers"
