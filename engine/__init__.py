"""In-process inference behind one `Engine` protocol (see `engine.base`)."""

from .base import (
    ChatMessage,
    Delta,
    Engine,
    Final,
    GenerationEvent,
    GenerationRequest,
    LoadedModel,
    LoadProgress,
    LoadSpec,
    MemoryReport,
    ModelId,
    RequestId,
    SamplingParams,
    Usage,
)
from .probe import mlc_available
from .registry import choose_engine, create_engine

__all__ = [
    "ChatMessage",
    "Delta",
    "Engine",
    "Final",
    "GenerationEvent",
    "GenerationRequest",
    "LoadProgress",
    "LoadSpec",
    "LoadedModel",
    "MemoryReport",
    "ModelId",
    "RequestId",
    "SamplingParams",
    "Usage",
    "choose_engine",
    "create_engine",
    "mlc_available",
]
