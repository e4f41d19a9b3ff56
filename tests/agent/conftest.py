"""Fixtures for the agent's tests: a neuron over the fake engine and a fixed-size cpu device."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from helexa.catalogue.entry import ModelEntry
from helexa.engine.base import ModelId
from helexa.engine.fake import FakeEngine
from helexa.mesh.fleet.records import DeviceRecord
from helexa.mesh.metrics import Metrics
from helexa.mesh.routing.neuron import Neuron, NeuronTiming, static_devices

# Short timings so back-offs and keep-alives pass in milliseconds.
FAST = NeuronTiming(
    load_retry_backoff_s=0.05,
    load_retry_backoff_max_s=0.2,
    structural_retry_backoff_s=30.0,
    reaper_interval_s=0.01,
    unload_timeout_s=2.0,
)


def entry(
    model_id: str, *, memory_mb: int = 100, options: dict[str, object] | None = None, **kw: Any
) -> ModelEntry:
    """A fake-engine catalogue entry whose fake model really takes `memory_mb`."""
    return ModelEntry(
        id=ModelId(model_id),
        source=f"/models/{model_id}",
        engine="fake",
        memory_mb=memory_mb,
        options={"memory_mb": memory_mb, **(options or {})},
        **kw,
    )


class Rig:
    """A neuron with one 1000 MB cpu device whose free memory is what the fake models leave."""

    def __init__(self, total_mb: int = 1000) -> None:
        self.engine = FakeEngine()
        self.metrics = Metrics(node="test")
        cpu = DeviceRecord(
            name="cpu", kind="cpu", model="test cpu", memory_total_mb=total_mb, memory_free_mb=total_mb
        )
        devices = static_devices(
            [cpu], lambda: {"cpu": sum(m.memory.total_mb for m in self.engine.loaded.values())}
        )
        self.neuron = Neuron(
            engine_for=lambda e, d: self.engine,
            devices=devices,
            metrics=self.metrics,
            timing=FAST,
            node_name="test",
        )


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    r = Rig()
    yield r
    await r.neuron.close()
