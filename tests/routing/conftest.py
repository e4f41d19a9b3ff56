"""The routing tests' rig: a neuron over the fake engine and a fixed-size cpu device."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from helexa.engine.fake import FakeEngine
from helexa.mesh.fleet.records import DeviceRecord
from helexa.mesh.metrics import Metrics
from helexa.mesh.routing.neuron import Neuron, static_devices
from tests.helpers.agents import FAST


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
