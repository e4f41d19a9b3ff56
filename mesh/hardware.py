"""Hardware discovery: GPUs through NVML (`nvidia-ml-py`), CPU and RAM through psutil.

A host with no NVIDIA driver (or no GPU) reports one `cpu` device whose memory is system RAM (free =
available), so CPU-only hosts can serve small models and route for others. That case is stated once, at
info level: it is a normal configuration, not an error.

Every probe is blocking (NVML calls, /proc reads): the agent calls `Hardware.sample()` which runs it in a
worker thread. Discovery never raises: any NVML failure after start degrades to the last good sample or
to the CPU device, logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pynvml  # nvidia-ml-py: cheap to import; the driver is loaded only by nvmlInit

from helexa.mesh.fleet.records import DeviceRecord
from helexa.mesh.logs import QuietLog
from helexa.mesh.timing import HARDWARE_SAMPLE_INTERVAL_S

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# A free-memory change smaller than this is noise (allocator churn): not worth a new record version.
SIGNIFICANT_CHANGE_MB = 256


@dataclass(frozen=True, kw_only=True, slots=True)
class HardwareSnapshot:
    """One sample of this host's devices."""

    devices: tuple[DeviceRecord, ...]
    gpu_available: bool
    driver_version: str | None = None
    cuda_version: str | None = None
    # Why there are no GPUs, when there are none ("no NVIDIA driver", "no GPU found", ...).
    no_gpu_reason: str | None = None
    cpu_count: int = 1
    ram_total_mb: int = 0

    def significantly_differs(self, other: HardwareSnapshot) -> bool:
        """True when the devices changed or some device's free memory moved by a significant amount."""
        if [d.name for d in self.devices] != [d.name for d in other.devices]:
            return True
        for a, b in zip(self.devices, other.devices, strict=True):
            if a.memory_total_mb != b.memory_total_mb:
                return True
            if abs(a.memory_free_mb - b.memory_free_mb) >= SIGNIFICANT_CHANGE_MB:
                return True
        return False


def _cpu_brand() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _decode(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class Hardware:
    """Probes this host's devices. Thread-safe; `probe()` blocks, `sample()` runs it off the loop.

    `nvml` lets tests pass a stand-in for the `pynvml` module (one raising on `nvmlInit` exercises the
    no-driver path on any machine).
    """

    def __init__(self, *, nvml: Any = None) -> None:
        self._nvml_module = nvml
        self._lock = threading.Lock()
        self._nvml: Any = None  # the initialised module, or None
        self._initialised = False
        self._no_gpu_reason: str | None = None
        self._driver_version: str | None = None
        self._cuda_version: str | None = None
        self._sample_errors = QuietLog()
        self._cpu_brand: str | None = None
        self.last: HardwareSnapshot | None = None

    # --- NVML -------------------------------------------------------------------------------------

    def _init_nvml(self) -> None:
        self._initialised = True
        nvml = self._nvml_module if self._nvml_module is not None else pynvml
        try:
            nvml.nvmlInit()
        except Exception as e:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ... all mean "no GPUs"
            self._no_gpu_reason = f"no NVIDIA driver ({_decode(e) or type(e).__name__})"
            log.info("no GPUs: %s; this host serves on the CPU (system RAM)", self._no_gpu_reason)
            return
        try:
            self._driver_version = _decode(nvml.nvmlSystemGetDriverVersion())
            with contextlib.suppress(Exception):
                cuda = int(nvml.nvmlSystemGetCudaDriverVersion())
                self._cuda_version = f"{cuda // 1000}.{(cuda % 1000) // 10}"
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as e:
            self._no_gpu_reason = f"NVML failed ({_decode(e)})"
            log.warning("no GPUs: %s; serving on the CPU", self._no_gpu_reason)
            return
        if count == 0:
            self._no_gpu_reason = "the NVIDIA driver reports no GPU"
            log.info("no GPUs: %s; serving on the CPU", self._no_gpu_reason)
            return
        self._nvml = nvml
        log.info(
            "found %d NVIDIA GPU(s), driver %s, CUDA %s", count, self._driver_version, self._cuda_version
        )

    def _gpu_devices(self) -> tuple[DeviceRecord, ...]:
        nvml = self._nvml
        devices: list[DeviceRecord] = []
        for index in range(int(nvml.nvmlDeviceGetCount())):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            utilization: float | None = None
            temperature: float | None = None
            capability: str | None = None
            uuid: str | None = None
            with contextlib.suppress(Exception):
                utilization = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu) / 100.0
            with contextlib.suppress(Exception):
                temperature = float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
            with contextlib.suppress(Exception):
                major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
                capability = f"{major}.{minor}"
            with contextlib.suppress(Exception):
                uuid = _decode(nvml.nvmlDeviceGetUUID(handle))
            devices.append(
                DeviceRecord(
                    name=f"cuda:{index}",
                    kind="cuda",
                    model=_decode(nvml.nvmlDeviceGetName(handle)),
                    uuid=uuid,
                    memory_total_mb=int(mem.total) // MIB,
                    memory_free_mb=int(mem.free) // MIB,
                    utilization=utilization,
                    temperature_c=temperature,
                    compute_capability=capability,
                )
            )
        return tuple(devices)

    # --- CPU --------------------------------------------------------------------------------------

    def _cpu_device(self) -> DeviceRecord:
        if self._cpu_brand is None:
            self._cpu_brand = _cpu_brand()
        vm = psutil.virtual_memory()
        return DeviceRecord(
            name="cpu",
            kind="cpu",
            model=self._cpu_brand,
            memory_total_mb=int(vm.total) // MIB,
            memory_free_mb=int(vm.available) // MIB,
            utilization=psutil.cpu_percent(interval=None) / 100.0,
        )

    # --- sampling ---------------------------------------------------------------------------------

    def probe(self) -> HardwareSnapshot:
        """Sample every device now (blocking). Never raises."""
        with self._lock:
            if not self._initialised:
                self._init_nvml()
            devices: tuple[DeviceRecord, ...] = ()
            if self._nvml is not None:
                try:
                    devices = self._gpu_devices()
                except Exception as e:
                    level = self._sample_errors.level("nvml")
                    log.log(level, "NVML sample failed (%s); keeping the last sample", _decode(e))
                    if self.last is not None and self.last.gpu_available:
                        return self.last
            gpu = bool(devices)
            if not gpu:
                try:
                    devices = (self._cpu_device(),)
                except Exception as e:  # pragma: no cover - psutil failing means /proc is gone
                    log.warning("cannot read system memory (%s)", e)
                    devices = (
                        DeviceRecord(
                            name="cpu", kind="cpu", model="cpu", memory_total_mb=0, memory_free_mb=0
                        ),
                    )
            snapshot = HardwareSnapshot(
                devices=devices,
                gpu_available=gpu,
                driver_version=self._driver_version,
                cuda_version=self._cuda_version,
                no_gpu_reason=None if gpu else (self._no_gpu_reason or "no GPU found"),
                cpu_count=psutil.cpu_count() or 1,
                ram_total_mb=int(psutil.virtual_memory().total) // MIB,
            )
            self.last = snapshot
            return snapshot

    async def sample(self) -> HardwareSnapshot:
        """`probe()` in a worker thread (NVML and /proc reads block)."""
        return await asyncio.to_thread(self.probe)

    async def run_sampler(
        self,
        on_change: Callable[[HardwareSnapshot], None],
        *,
        interval_s: float = HARDWARE_SAMPLE_INTERVAL_S,
    ) -> None:
        """Refresh live free memory every `interval_s`; call `on_change` on a significant change.

        Runs until cancelled (the agent starts it in its cleanup context).
        """
        previous = self.last
        while True:
            await asyncio.sleep(interval_s)
            try:
                snapshot = await self.sample()
            except Exception:  # pragma: no cover - probe() never raises; belt and braces
                log.exception("hardware sample failed")
                continue
            if previous is None or snapshot.significantly_differs(previous):
                previous = snapshot
                on_change(snapshot)

    def shutdown(self) -> None:
        """Release NVML (blocking; harmless when it was never initialised)."""
        with self._lock:
            if self._nvml is not None:
                with contextlib.suppress(Exception):
                    self._nvml.nvmlShutdown()
                self._nvml = None
                self._initialised = False
