"""Hardware discovery: the no-driver path (this machine's) and NVML through a stand-in module."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import psutil
import pytest

from helexa.mesh.hardware import Hardware
from tests.helpers.polling import eventually


class _NoDriver:
    class NVMLError(Exception):
        pass

    def nvmlInit(self) -> None:
        raise self.NVMLError("NVML Shared Library Not Found")


def test_no_driver_gives_one_cpu_device(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="helexa.mesh.hardware")
    hw = Hardware(nvml=_NoDriver())
    snap = hw.probe()
    assert not snap.gpu_available
    assert snap.no_gpu_reason is not None and "no NVIDIA driver" in snap.no_gpu_reason
    assert [d.name for d in snap.devices] == ["cpu"]
    cpu = snap.devices[0]
    assert cpu.kind == "cpu"
    total_mb = psutil.virtual_memory().total // (1024 * 1024)
    assert cpu.memory_total_mb == total_mb
    assert 0 < cpu.memory_free_mb <= total_mb
    hw.probe()
    messages = [r.getMessage() for r in caplog.records if "no NVIDIA driver" in r.getMessage()]
    assert len(messages) == 1  # stated once, not at every sample
    assert all(r.levelno == logging.INFO for r in caplog.records)


async def test_real_probe_off_the_loop_never_fails() -> None:
    # Whatever this machine has (here: no driver), sampling works and yields at least one device.
    snap = await Hardware().sample()
    assert snap.devices
    assert all(d.memory_total_mb > 0 for d in snap.devices)


class _FakeNvml:
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, free: list[int]) -> None:
        self.free = free
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return "560.35.03"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12060

    def nvmlDeviceGetCount(self) -> int:
        return len(self.free)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        total = 24 * 1024**3
        return SimpleNamespace(total=total, free=self.free[h], used=total - self.free[h])

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return b"NVIDIA GeForce RTX 4090"

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return f"GPU-{h}"

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=12, memory=3)

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        return 54

    def nvmlDeviceGetCudaComputeCapability(self, h: int) -> tuple[int, int]:
        return (8, 9)


def test_nvml_devices_are_reported() -> None:
    nvml = _FakeNvml([20 * 1024**3, 10 * 1024**3])
    hw = Hardware(nvml=nvml)
    snap = hw.probe()
    assert snap.gpu_available
    assert snap.driver_version == "560.35.03"
    assert snap.cuda_version == "12.6"
    assert [d.name for d in snap.devices] == ["cuda:0", "cuda:1"]
    d0 = snap.devices[0]
    assert (d0.kind, d0.model, d0.uuid) == ("cuda", "NVIDIA GeForce RTX 4090", "GPU-0")
    assert (d0.memory_total_mb, d0.memory_free_mb) == (24 * 1024, 20 * 1024)
    assert d0.utilization == pytest.approx(0.12)
    assert d0.temperature_c == 54.0
    assert d0.compute_capability == "8.9"
    # A small change is noise; a large one is significant.
    nvml.free[0] -= 10 * 1024**2
    assert not hw.probe().significantly_differs(snap)
    nvml.free[0] -= 2 * 1024**3
    assert hw.probe().significantly_differs(snap)
    hw.shutdown()
    assert nvml.shutdowns == 1


async def test_sampler_reports_significant_changes_only() -> None:
    nvml = _FakeNvml([20 * 1024**3])
    hw = Hardware(nvml=nvml)
    hw.probe()
    changes: list[int] = []
    task = asyncio.create_task(
        hw.run_sampler(lambda s: changes.append(s.devices[0].memory_free_mb), interval_s=0.01)
    )
    try:
        await asyncio.sleep(0.1)
        assert changes == []  # nothing moved
        nvml.free[0] -= 4 * 1024**3  # a model was loaded
        await eventually(lambda: changes, timeout_s=1.0, interval_s=0.01, what="a sampled change")
        assert changes == [16 * 1024]
    finally:
        task.cancel()


def test_nvml_failing_after_start_keeps_the_last_sample() -> None:
    nvml = _FakeNvml([20 * 1024**3])
    hw = Hardware(nvml=nvml)
    first = hw.probe()

    def broken(h: int) -> None:
        raise RuntimeError("GPU is lost")

    nvml.nvmlDeviceGetMemoryInfo = broken  # type: ignore[method-assign,assignment]
    assert hw.probe() == first
