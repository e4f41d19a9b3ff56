"""One catalogue entry: how to serve a model (not where).

Parsing and validation live in `catalogue.validate`; reading and writing `models.toml` (tomlkit,
comments kept) in `catalogue.store`; feasibility and placement in `catalogue.placement`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from helexa.engine.base import ModelId

EngineChoice = Literal["auto", "mlc", "transformers", "fake"]
# What a model does: `generate` text (chat and completions) or `embed` inputs into vectors.
Task = Literal["generate", "embed"]

# Default idle time before an unused model is unloaded.
DEFAULT_KEEP_ALIVE_S = 30 * 60.0


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelEntry:
    """A validated catalogue entry.

    `keep_alive_s`: None = never unload when idle (`keep_alive = -1`), 0 = unload as soon as idle.
    `source`: local paths are already resolved to absolute paths against the catalogue file's folder, and
    `builtin:NAME` to the package's `catalogue/NAME/` directory on this host.
    `source_spec`: the portable spelling of `source` when it differs (`builtin:demo`); gossip carries it so
    each host resolves it against its own installation. None otherwise.
    `version`: grows with every edit; gossip keeps the newer version of an id mesh-wide.
    `task`: `generate` (a chat or completion model) or `embed` (an encoder or embedding model, served by
    `/v1/embeddings` only).
    `defaults`: default sampling (`temperature`, `top_p`, `top_k`, `max_tokens`) applied when a request
    leaves a field out.
    """

    id: ModelId
    source: str
    engine: EngineChoice = "auto"
    task: Task = "generate"
    revision: str | None = None
    quant: str | None = None
    memory_mb: int = 0
    min_devices: int = 1
    min_device_memory_mb: int = 0
    pinned_on: tuple[str, ...] = ()
    resident: bool = False
    aliases: tuple[str, ...] = ()
    keep_alive_s: float | None = DEFAULT_KEEP_ALIVE_S
    preload: bool = False
    context_length: int | None = None
    defaults: dict[str, float | int] = field(default_factory=dict)
    version: int = 1
    # Engine-specific extras passed through to `LoadSpec.options` (the fake engine's script).
    options: dict[str, object] = field(default_factory=dict)
    source_spec: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """Every name that resolves to this entry: the id first, then the aliases."""
        return (self.id, *self.aliases)
