"""The neuron role: this agent's local model manager.

`Neuron` holds the models loaded on this host and hands out reservations on them:

    async with neuron.acquire(entry) as model:     # cold-loads if needed; holds an in-flight slot
        async for event in model.generate(request): ...

Rules it keeps (each one a production failure elsewhere, see LESSONS.md):

- Loads are single-flight per model: the decision to start one is taken under one lock, with the state
  re-checked after acquiring it, and every concurrent caller awaits the same load task. Loads of
  different models run side by side; requests to loaded models never wait on a load.
- Reservations (queued while loading, in flight while generating) are released in `finally` blocks, so
  a cancelled client never leaks a counter; a model with requests in flight is never evicted.
- Eviction frees room for a new model by unloading least recently used idle models that are not
  `resident` (`catalogue.placement.eviction_plan`). Idle models unload after their `keep_alive`.
- A failed load marks the model `failed` with its error; the next request after a back-off retries
  (short for transient errors, long for structural ones, so a broken entry is never retried in a hot
  loop). An `EngineFault` while generating marks only that model failed and unloads it; the next request
  loads it again.

State is published as `ModelRecord`s (`records()`), plus two observer lists: `on_change` (anything that
changes this node's record: the fleet rebuilds it) and `on_event` (loads, unloads, evictions, failures:
what `/mesh/events` streams).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from helexa.catalogue import placement
from helexa.catalogue.entry import ModelEntry
from helexa.engine.base import (
    EmbeddingModel,
    Embeddings,
    EmbedInput,
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
)
from helexa.engine.errors import EngineError, EngineFault, LoadError, ModelSourceError, RequestError
from helexa.mesh import errors
from helexa.mesh.fleet.records import DeviceRecord, ModelRecord, ModelStatus
from helexa.mesh.metrics import Metrics
from helexa.mesh.timing import (
    LOAD_RETRY_BACKOFF_MAX_S,
    LOAD_RETRY_BACKOFF_S,
    REAPER_INTERVAL_S,
    STRUCTURAL_RETRY_BACKOFF_S,
    UNLOAD_TIMEOUT_S,
)

log = logging.getLogger(__name__)

# --- timings (tests shrink them through `NeuronTiming`) ---------------------------------------------

# Weight of the newest sample in the published recent-average time to first token.
TTFT_SMOOTHING = 0.3

# Error codes of this node's refusals: the model cannot run here or does not fit now, or the node is
# shutting down. An entry agent that forwarded a cold request here tries its next candidate on these.
NO_ROOM_CODE = "no_room"
DRAINING_CODE = "node_draining"
REFUSAL_CODES = frozenset({NO_ROOM_CODE, DRAINING_CODE})


@dataclass(frozen=True, kw_only=True, slots=True)
class NeuronTiming:
    load_retry_backoff_s: float = LOAD_RETRY_BACKOFF_S
    load_retry_backoff_max_s: float = LOAD_RETRY_BACKOFF_MAX_S
    structural_retry_backoff_s: float = STRUCTURAL_RETRY_BACKOFF_S
    reaper_interval_s: float = REAPER_INTERVAL_S
    unload_timeout_s: float = UNLOAD_TIMEOUT_S


# At most this much of an engine's load failure reaches the operator (`with_load_detail`).
LOAD_DETAIL_MAX_CHARS = 500

NeuronEventKind = Literal["loading", "loaded", "load_failed", "unloaded", "evicted", "fault"]
# Why the agent unloads a model on its own (the `reason` label of `helexa_evictions_total`).
Eviction = Literal["memory", "idle"]


@dataclass(frozen=True, kw_only=True, slots=True)
class NeuronEvent:
    """Something `/mesh/events` should tell the dashboard."""

    kind: NeuronEventKind
    model: ModelId
    at: float  # unix seconds
    devices: tuple[str, ...] = ()
    memory_mb: int = 0
    duration_s: float | None = None
    error: str | None = None
    reason: str | None = None  # why it was unloaded: "keep_alive", "evicted for X", "fault", "request"


class DeviceSource(Protocol):
    """Where the neuron reads live device memory (`mesh.hardware.Hardware` in the agent)."""

    def devices(self) -> tuple[DeviceRecord, ...]: ...
    async def refresh(self) -> tuple[DeviceRecord, ...]: ...


EngineFactory = Callable[[ModelEntry, tuple[DeviceRecord, ...]], Engine]


@dataclass(kw_only=True)
class _Slot:
    """Mutable per-model state. Touched only on the event loop."""

    entry: ModelEntry
    status: ModelStatus = "loading"
    engine_name: str = ""
    model: LoadedModel | None = None
    devices: tuple[str, ...] = ()
    load_task: asyncio.Task[LoadedModel] | None = None
    unload_task: asyncio.Task[None] | None = None
    in_flight: int = 0
    queued: int = 0
    last_used: float = 0.0  # wall clock (published)
    last_used_mono: float = 0.0  # monotonic (keep-alive, LRU)
    memory_mb: int = 0
    progress: float | None = None
    load_progress: LoadProgress | None = None  # the engine's last report while loading
    error: str | None = None
    client_error: errors.HelexaError | None = None
    retry_at_mono: float = 0.0
    consecutive_failures: int = 0
    tokens_per_s: float | None = None
    requests_total: int = 0
    ttft_s: float | None = None
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self) -> ModelRecord:
        # Reservations whose request waits inside the engine for room in its batch count as queued.
        waiting = min(self.in_flight, self.model.waiting) if self.model is not None else 0
        return ModelRecord(
            id=self.entry.id,
            status=self.status,
            engine=self.engine_name,
            devices=self.devices,
            memory_mb=self.memory_mb,
            in_flight=self.in_flight - waiting,
            queued=self.queued + waiting,
            last_used=self.last_used,
            progress=self.progress,
            phase=lp.phase if (lp := self.load_progress) is not None else None,
            done_bytes=lp.done_bytes if lp is not None else None,
            total_bytes=lp.total_bytes if lp is not None else None,
            bytes_per_s=lp.bytes_per_s if lp is not None else None,
            error=self.error,
            tokens_per_s=self.tokens_per_s,
            resident=self.entry.resident,
            requests_total=self.requests_total,
            ttft_s=self.ttft_s,
        )


class Neuron:
    """The local model manager. Create it inside a running event loop."""

    def __init__(
        self,
        *,
        engine_for: EngineFactory,
        devices: DeviceSource,
        node_name: str = "",
        node_id: str = "",
        metrics: Metrics | None = None,
        timing: NeuronTiming | None = None,
        cache_dir: Path | None = None,
        gguf_cache_dir: Path | None = None,
        gguf_cache_mb: int | None = None,
    ) -> None:
        self._engine_for = engine_for
        self._devices = devices
        self._node_name = node_name
        self._node_id = node_id
        self._metrics = metrics
        self._timing = timing or NeuronTiming()
        self._cache_dir = cache_dir
        self._gguf_cache = (gguf_cache_dir, gguf_cache_mb)
        self._lock = asyncio.Lock()
        self._slots: dict[ModelId, _Slot] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self.on_change: list[Callable[[], None]] = []
        self.on_event: list[Callable[[NeuronEvent], None]] = []
        # Counted for tests and benchmarks: engine.load() calls actually started.
        self.loads_started = 0

    # --- published state ---------------------------------------------------------------------------

    def records(self) -> tuple[ModelRecord, ...]:
        """Every model present on this host (loading, loaded, unloading, failed), sorted by id."""
        return tuple(self._slots[k].record() for k in sorted(self._slots))

    def record(self, model_id: str) -> ModelRecord | None:
        slot = self._slots.get(ModelId(model_id))
        return slot.record() if slot else None

    def with_load_detail(self, model_id: str, err: errors.HelexaError) -> errors.HelexaError:
        """`err`, from a load of `model_id` on this node, with the engine's reason in its message (for the
        operator and peer APIs only: the client API never shows it, it may name files). Other errors, and
        a failure whose reason this neuron no longer holds, are returned as they are. Only the reason's
        first line is kept, cut at `LOAD_DETAIL_MAX_CHARS` (a traceback or a dumped config says no more)."""
        load_failure = isinstance(err, errors.ModelLoadFailed) or (
            isinstance(err, errors.ModelUnavailable) and err.reason == "insufficient_memory"
        )
        record = self.record(model_id) if load_failure else None
        if record is None or record.status != "failed" or not record.error:
            return err
        lines = [line.strip() for line in record.error.splitlines() if line.strip()]
        if not lines:
            return err
        detail = lines[0]
        if len(detail) > LOAD_DETAIL_MAX_CHARS:
            detail = detail[: LOAD_DETAIL_MAX_CHARS - 3] + "..."
        out = copy.copy(err)
        out.message = f"{model_id} failed to load on {self._node_name}: {detail}"
        out.args = (out.message,)
        return out

    def status(self, model_id: str) -> ModelStatus | None:
        slot = self._slots.get(ModelId(model_id))
        return slot.status if slot else None

    def _changed(self) -> None:
        for callback in list(self.on_change):
            try:
                callback()
            except Exception:
                log.exception("on_change observer failed")

    def _emit(self, event: NeuronEvent) -> None:
        for callback in list(self.on_event):
            try:
                callback(event)
            except Exception:
                log.exception("on_event observer failed")
        self._changed()

    def _counts_changed(self, slot: _Slot) -> None:
        if self._metrics is not None:
            self._metrics.set_model_load(model=slot.entry.id, in_flight=slot.in_flight, queued=slot.queued)
        self._changed()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- loading -----------------------------------------------------------------------------------

    async def ensure_loaded(self, entry: ModelEntry) -> LoadedModel:
        """The loaded model, cold-loading it if needed (single-flight). No reservation is held."""
        _slot, model = await self._reserve(entry, hold=False)
        return model

    @asynccontextmanager
    async def acquire(self, entry: ModelEntry) -> AsyncIterator[LoadedModel]:
        """Load if needed and hold an in-flight reservation for the body of the `async with`.

        The model yielded reports faults back here (an `EngineFault` marks it failed and unloads it)
        and feeds the tokens/s figure.
        """
        slot, model = await self._reserve(entry, hold=True)
        try:
            yield _Guarded(model, self, slot)
        finally:
            self._release(slot)

    async def _reserve(self, entry: ModelEntry, *, hold: bool) -> tuple[_Slot, LoadedModel]:
        """Wait until `entry` is loaded; with `hold`, take an in-flight reservation atomically with the
        final check (no await between seeing `loaded` and counting in_flight, so the model cannot be
        evicted in between)."""
        queued_on: _Slot | None = None
        try:
            while True:
                if self._closing:
                    raise errors.ModelUnavailable(
                        "this agent is shutting down",
                        reason="draining",
                        retry_after_s=1.0,
                        code=DRAINING_CODE,
                    )
                async with self._lock:
                    # Re-check under the lock: another caller may have started or finished a load.
                    slot = self._slots.get(entry.id)
                    if slot is not None and slot.status == "loaded" and slot.model is not None:
                        if slot.entry.version < entry.version:
                            slot.entry = entry  # newer catalogue settings (keep_alive, resident)
                        if hold:
                            slot.in_flight += 1
                            slot.requests_total += 1
                            slot.idle.clear()
                        slot.last_used = time.time()
                        slot.last_used_mono = time.monotonic()
                        if queued_on is slot:
                            slot.queued -= 1
                            queued_on = None
                        self._counts_changed(slot)
                        return slot, slot.model
                    if slot is not None and slot.status == "failed" and slot.load_task is None:
                        wait_s = slot.retry_at_mono - time.monotonic()
                        if wait_s > 0 and slot.client_error is not None:
                            err = copy.copy(slot.client_error)
                            err.retry_after_s = max(wait_s, 1.0) if err.retry_after_s is not None else None
                            raise err
                    if slot is not None and slot.status == "unloading" and slot.unload_task is not None:
                        waiter: asyncio.Future[Any] = slot.unload_task
                    elif slot is not None and slot.status == "loading" and slot.load_task is not None:
                        waiter = slot.load_task
                    else:
                        slot = self._start_load(entry, slot)
                        assert slot.load_task is not None
                        waiter = slot.load_task
                    if hold and queued_on is not slot:
                        if queued_on is not None:
                            queued_on.queued -= 1
                        slot.queued += 1
                        queued_on = slot
                        self._counts_changed(slot)
                # Outside the lock: wait for the load (or unload) without holding anyone else up.
                # asyncio.wait neither raises the load's error nor cancels the load when this waiter is
                # cancelled, so one client going away never cancels the load the others wait for.
                await asyncio.wait({waiter})
                if (
                    waiter is not slot.unload_task
                    and slot.status == "failed"
                    and slot.client_error is not None
                ):
                    # The load we waited on failed: every waiter gets its error (nobody starts another).
                    raise copy.copy(slot.client_error)
        finally:
            if queued_on is not None:
                queued_on.queued -= 1
                self._counts_changed(queued_on)

    def _start_load(self, entry: ModelEntry, previous: _Slot | None) -> _Slot:
        """Create the loading slot and its single load task. Called with the lock held."""
        slot = _Slot(entry=entry, status="loading", memory_mb=entry.memory_mb)
        if previous is not None:
            slot.consecutive_failures = previous.consecutive_failures
        slot.last_used = time.time()
        slot.last_used_mono = time.monotonic()
        self._slots[entry.id] = slot
        slot.load_task = self._spawn(self._load(slot), name=f"load {entry.id}")
        # Nobody may be awaiting it when it fails (a preload): read its exception so asyncio does not
        # log "exception was never retrieved".
        slot.load_task.add_done_callback(lambda t: None if t.cancelled() else t.exception())
        self._emit(NeuronEvent(kind="loading", model=entry.id, at=time.time(), memory_mb=entry.memory_mb))
        return slot

    async def _load(self, slot: _Slot) -> LoadedModel:
        entry = slot.entry
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            devices = await self._make_room(slot)
            slot.devices = tuple(d.name for d in devices)
            engine = self._engine_for(entry, devices)
            slot.engine_name = engine.name
            spec = LoadSpec(
                model_id=entry.id,
                source=entry.source,
                devices=slot.devices,
                revision=entry.revision,
                quant=entry.quant,
                context_length=entry.context_length,
                memory_mb=entry.memory_mb or None,
                cache_dir=self._cache_dir,
                gguf_cache_dir=self._gguf_cache[0],
                gguf_cache_mb=self._gguf_cache[1],
                task=entry.task,
                options=dict(entry.options),
            )

            def progress(p: LoadProgress) -> None:
                # Engines may report from their loader thread: hop onto the loop.
                def apply() -> None:
                    if slot.status == "loading":
                        slot.progress = p.fraction
                        slot.load_progress = p
                        self._changed()

                with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
                    loop.call_soon_threadsafe(apply)

            self.loads_started += 1
            log.info("loading %s on %s with %s", entry.id, ",".join(slot.devices), engine.name)
            model = await engine.load(spec, progress)
        except asyncio.CancelledError:
            self._load_failed(
                slot,
                errors.ModelUnavailable("the load was cancelled", reason="cancelled"),
                "cancelled",
                started,
                retry_after_s=0.0,
            )
            raise
        except errors.HelexaError as e:
            self._load_failed(slot, e, e.message, started)
            raise
        except EngineError as e:
            structural = isinstance(e, ModelSourceError)
            self._load_failed(
                slot, errors.from_engine_error(e), str(e) or type(e).__name__, started, structural=structural
            )
            raise
        except Exception as e:  # an engine bug: treat it as a load error, never as an agent failure
            log.exception("loading %s raised unexpectedly", entry.id)
            self._load_failed(slot, errors.ModelLoadFailed(), f"{type(e).__name__}: {e}", started)
            raise LoadError(str(e)) from e
        duration_s = time.monotonic() - started
        if self._closing or self._slots.get(entry.id) is not slot:
            # Shut down (or superseded) while loading: do not keep it.
            await self._unload_model(model, entry.id)
            raise errors.ModelUnavailable(
                "this agent is shutting down", reason="draining", code=DRAINING_CODE
            )
        slot.model = model
        slot.status = "loaded"
        slot.load_task = None
        slot.progress = None
        slot.load_progress = None
        slot.error = None
        slot.client_error = None
        slot.consecutive_failures = 0
        slot.memory_mb = _measured_mb(model.memory, entry.memory_mb)
        slot.last_used = time.time()
        slot.last_used_mono = time.monotonic()
        if slot.in_flight == 0:
            slot.idle.set()
        log.info(
            "loaded %s in %.2f s (%d MB on %s)", entry.id, duration_s, slot.memory_mb, ",".join(slot.devices)
        )
        if self._metrics is not None:
            self._metrics.model_loaded(model=entry.id, result="ok", duration_s=duration_s)
        self._emit(
            NeuronEvent(
                kind="loaded",
                model=entry.id,
                at=time.time(),
                devices=slot.devices,
                memory_mb=slot.memory_mb,
                duration_s=duration_s,
            )
        )
        # Let placement see the memory the model really took.
        _ = self._spawn(self._refresh_devices(), name="refresh devices")
        return model

    def _load_failed(
        self,
        slot: _Slot,
        client_error: errors.HelexaError,
        detail: str,
        started: float,
        *,
        structural: bool = False,
        retry_after_s: float | None = None,
    ) -> None:
        duration_s = time.monotonic() - started
        slot.consecutive_failures += 1
        if retry_after_s is None:
            if structural:
                retry_after_s = self._timing.structural_retry_backoff_s
            else:
                retry_after_s = min(
                    self._timing.load_retry_backoff_s * 2 ** (slot.consecutive_failures - 1),
                    self._timing.load_retry_backoff_max_s,
                )
        slot.status = "failed"
        slot.load_task = None
        slot.model = None
        slot.progress = None
        slot.load_progress = None
        slot.error = detail
        slot.client_error = client_error
        slot.retry_at_mono = time.monotonic() + retry_after_s
        log.warning(
            "loading %s failed after %.2f s: %s (next try in %.0f s)",
            slot.entry.id,
            duration_s,
            detail,
            retry_after_s,
        )
        if self._metrics is not None:
            self._metrics.model_loaded(model=slot.entry.id, result="error", duration_s=duration_s)
        self._emit(
            NeuronEvent(
                kind="load_failed",
                model=slot.entry.id,
                at=time.time(),
                error=detail,
                duration_s=duration_s,
                devices=slot.devices,
            )
        )

    async def _refresh_devices(self) -> None:
        try:
            await self._devices.refresh()
        except Exception:
            log.exception("device refresh failed")
        self._changed()

    # --- placement and eviction --------------------------------------------------------------------

    def _reserved_mb(self, exclude: _Slot) -> dict[str, int]:
        """Memory promised to other loads in progress (not yet visible in a device sample)."""
        reserved: dict[str, int] = {}
        for other in self._slots.values():
            if other is exclude or other.status != "loading" or not other.devices:
                continue
            share = other.entry.memory_mb // max(1, len(other.devices))
            for name in other.devices:
                reserved[name] = reserved.get(name, 0) + share
        return reserved

    def _device_view(self, slot: _Slot) -> tuple[DeviceRecord, ...]:
        reserved = self._reserved_mb(slot)
        return tuple(
            replace(d, memory_free_mb=max(0, d.memory_free_mb - reserved.get(d.name, 0)))
            for d in self._devices.devices()
        )

    def _local_node(self, slot: _Slot) -> _LocalNode:
        """This node as `catalogue.placement` sees it, for placing `slot`: live free memory (minus what
        other loads in progress will take) and every other model present here."""
        return _LocalNode(
            node_id=self._node_id,
            name=self._node_name,
            devices=self._device_view(slot),
            models=tuple(s.record() for s in self._slots.values() if s is not slot),
        )

    async def _make_room(self, slot: _Slot) -> tuple[DeviceRecord, ...]:
        """Pick devices for `slot`, evicting idle non-resident models (LRU first) if that makes it fit.

        Raises `ModelUnavailable` when it cannot run here at all, or cannot fit even after eviction.
        """
        entry = slot.entry
        async with self._lock:
            node = self._local_node(slot)
            chosen = placement.devices_fitting_now(entry, node)
            if chosen is not None:
                return _by_name(node.devices, chosen)
            # Without the node's name: this message can reach a client (through a forwarded request), and
            # client messages carry no internal hostnames (`mesh.errors`).
            reason = placement.infeasible_reason(entry, replace(node, name="\x00"))
            if reason is not None:
                reason = reason.replace("node \x00", "this node").replace("\x00", "this node")
                raise errors.ModelUnavailable(
                    f"The model '{entry.id}' cannot run on this node: {reason}",
                    reason="infeasible",
                    retry_after_s=None,
                    code=NO_ROOM_CODE,
                )
            victims = placement.eviction_plan(entry, node, now=time.time())
            if not victims:
                busy = any(m.in_flight or m.queued for m in node.models)
                raise errors.ModelUnavailable(
                    f"The model '{entry.id}' does not fit in the memory free on this node now"
                    f" ({_describe(node.devices)}), even after unloading its idle models",
                    reason="insufficient_memory",
                    # Waiting helps when busy models may become idle (and evictable).
                    retry_after_s=5.0 if busy else None,
                    code=NO_ROOM_CODE,
                )
            victim_slots = [self._slots[v] for v in victims if v in self._slots]
            for victim in victim_slots:
                # Out of routing now, under the lock: nothing can reserve them any more.
                log.warning(
                    "evicting %s (%d MB, idle, least recently used) to make room for %s",
                    victim.entry.id,
                    victim.memory_mb,
                    entry.id,
                )
                self._begin_unload(victim, reason=f"evicted for {entry.id}", eviction="memory")
        for victim in victim_slots:
            if victim.unload_task is not None:
                await asyncio.wait({victim.unload_task})
        await self._devices.refresh()
        async with self._lock:
            node = self._local_node(slot)
            chosen = placement.devices_fitting_now(entry, node)
        if chosen is None:
            raise errors.ModelUnavailable(
                f"The model '{entry.id}' does not fit in the memory free on this node now"
                f" ({_describe(node.devices)})",
                reason="insufficient_memory",
                retry_after_s=5.0,
                code=NO_ROOM_CODE,
            )
        return _by_name(node.devices, chosen)

    # --- unloading ---------------------------------------------------------------------------------

    def _begin_unload(self, slot: _Slot, *, reason: str, eviction: Eviction | None = None) -> None:
        """Mark `slot` unloading and start its unload task. Call with no awaits before acting.

        `eviction`: why the agent unloads it on its own (`memory`: room for another model; `idle`: its
        keep_alive ran out), counted in `helexa_evictions_total`; None for operator unloads."""
        if slot.status != "loaded" or slot.model is None:
            return
        slot.status = "unloading"
        model = slot.model
        slot.unload_task = self._spawn(
            self._finish_unload(slot, model, reason, eviction), name=f"unload {slot.entry.id}"
        )
        self._changed()

    async def _finish_unload(
        self, slot: _Slot, model: LoadedModel, reason: str, eviction: Eviction | None
    ) -> None:
        try:
            # Requests still holding it (an explicit unload) finish first.
            await slot.idle.wait()
            await self._unload_model(model, slot.entry.id)
        finally:
            slot.model = None
            if self._slots.get(slot.entry.id) is slot:
                del self._slots[slot.entry.id]
            log.info("unloaded %s (%s)", slot.entry.id, reason)
            if self._metrics is not None:
                self._metrics.model_unloaded(model=slot.entry.id)
                self._metrics.forget_model(model=slot.entry.id)
                if eviction is not None:
                    self._metrics.evicted(reason=eviction)
            self._emit(
                NeuronEvent(
                    kind="evicted" if eviction == "memory" else "unloaded",
                    model=slot.entry.id,
                    at=time.time(),
                    devices=slot.devices,
                    memory_mb=slot.memory_mb,
                    reason=reason,
                )
            )
            _ = self._spawn(self._refresh_devices(), name="refresh devices")

    async def _unload_model(self, model: LoadedModel, model_id: str) -> None:
        try:
            async with asyncio.timeout(self._timing.unload_timeout_s):
                await model.unload()
        except TimeoutError:
            log.error(
                "unloading %s took longer than %.0f s; abandoning it", model_id, self._timing.unload_timeout_s
            )
        except Exception:
            log.exception("unloading %s failed", model_id)

    async def unload(self, model_id: str, *, reason: str = "request") -> bool:
        """Unload a model (after its in-flight requests finish). False when it was not loaded."""
        async with self._lock:
            slot = self._slots.get(ModelId(model_id))
            if slot is None:
                return False
            if slot.status == "failed" and slot.load_task is None:
                del self._slots[slot.entry.id]
                self._changed()
                return True
            self._begin_unload(slot, reason=reason)
            task = slot.unload_task
        if task is None:
            return False
        await asyncio.shield(task)
        return True

    def _release(self, slot: _Slot) -> None:
        slot.in_flight -= 1
        slot.last_used = time.time()
        slot.last_used_mono = time.monotonic()
        if slot.in_flight == 0:
            slot.idle.set()
            keep_alive = slot.entry.keep_alive_s
            if keep_alive is not None and keep_alive <= 0 and slot.queued == 0:
                # keep_alive = 0: unload right after the last request.
                self._begin_unload(slot, reason="keep_alive", eviction="idle")
        self._counts_changed(slot)

    def reap_idle(self) -> list[ModelId]:
        """Start unloading every idle model past its keep_alive; returns their ids."""
        now = time.monotonic()
        reaped: list[ModelId] = []
        for slot in list(self._slots.values()):
            keep_alive = slot.entry.keep_alive_s
            if slot.status != "loaded" or keep_alive is None:
                continue
            if slot.in_flight == 0 and slot.queued == 0 and now - slot.last_used_mono >= keep_alive:
                self._begin_unload(slot, reason="keep_alive", eviction="idle")
                reaped.append(slot.entry.id)
        return reaped

    async def run_reaper(self) -> None:
        """Unload idle models after their keep_alive, until cancelled (started in cleanup_ctx)."""
        while True:
            await asyncio.sleep(self._timing.reaper_interval_s)
            try:
                self.reap_idle()
            except Exception:  # pragma: no cover - a bug here must not stop the reaper
                log.exception("keep-alive reaper failed")

    # --- faults ------------------------------------------------------------------------------------

    def report_fault(self, slot_or_id: _Slot | str, exc: BaseException) -> None:
        """The model broke while generating: mark it failed, unload it; the next request reloads it."""
        slot = slot_or_id if isinstance(slot_or_id, _Slot) else self._slots.get(ModelId(slot_or_id))
        if slot is None or self._slots.get(slot.entry.id) is not slot or slot.status != "loaded":
            return
        model = slot.model
        slot.status = "failed"
        slot.model = None
        slot.error = f"fault: {exc}"
        slot.client_error = errors.ModelFault()
        slot.retry_at_mono = time.monotonic()  # reload on the very next request
        log.error("model %s faulted (%s); unloading it, it reloads on the next request", slot.entry.id, exc)
        self._emit(
            NeuronEvent(
                kind="fault", model=slot.entry.id, at=time.time(), error=str(exc), devices=slot.devices
            )
        )
        if model is not None:
            _ = self._spawn(self._unload_model(model, slot.entry.id), name=f"unload faulted {slot.entry.id}")
            if self._metrics is not None:
                self._metrics.model_unloaded(model=slot.entry.id)

    def _record_ttft(self, slot: _Slot, seconds: float) -> None:
        # A smoothed recent average (published; the dashboard shows it).
        slot.ttft_s = (
            seconds if slot.ttft_s is None else (1 - TTFT_SMOOTHING) * slot.ttft_s + TTFT_SMOOTHING * seconds
        )

    def _record_rate(self, slot: _Slot, completion_tokens: int, decode_s: float) -> None:
        if completion_tokens < 2 or decode_s <= 0:
            return
        rate = completion_tokens / decode_s
        # A smoothed recent rate, so one short answer does not swing the dashboard.
        slot.tokens_per_s = rate if slot.tokens_per_s is None else 0.7 * slot.tokens_per_s + 0.3 * rate

    # --- lifecycle ---------------------------------------------------------------------------------

    async def preload(self, entries: Sequence[ModelEntry]) -> None:
        """Load each entry marked `preload` (in the background at start; failures are logged)."""
        for entry in entries:
            if not entry.preload:
                continue
            try:
                await self.ensure_loaded(entry)
            except (EngineError, errors.HelexaError) as e:
                log.warning("preloading %s failed: %s", entry.id, e)

    async def wait_idle(self, *, poll_s: float = 0.05) -> None:
        """Return once no model has requests in flight or queued (the drain waits on this)."""
        while busy := [s for s in self._slots.values() if s.in_flight or s.queued]:
            # Wait on the first busy model, but wake up every `poll_s` to re-check: a request queued on a
            # load that fails never makes its slot idle.
            event = busy[0].idle if not busy[0].idle.is_set() else asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll_s):
                    await event.wait()

    async def close(self) -> None:
        """Stop admitting, cancel loads and unload everything (bounded per model)."""
        self._closing = True
        for slot in list(self._slots.values()):
            if slot.load_task is not None:
                slot.load_task.cancel()
        for slot in list(self._slots.values()):
            if slot.model is not None:
                await self._unload_model(slot.model, slot.entry.id)
                slot.model = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        self._slots.clear()


@dataclass(frozen=True, kw_only=True, slots=True)
class _LocalNode:
    """This node as a `catalogue.placement.NodeView` (engines empty: the engine factory decides)."""

    node_id: str
    name: str
    devices: tuple[DeviceRecord, ...]
    models: tuple[ModelRecord, ...]
    engines: tuple[str, ...] = ()
    draining: bool = False


def _by_name(devices: Sequence[DeviceRecord], names: Sequence[str]) -> tuple[DeviceRecord, ...]:
    index = {d.name: d for d in devices}
    return tuple(index[n] for n in names)


class _Guarded:
    """A `LoadedModel` view that reports faults and decode rates back to the neuron."""

    def __init__(self, model: LoadedModel, neuron: Neuron, slot: _Slot) -> None:
        self._model = model
        self._neuron = neuron
        self._slot = slot

    @property
    def model_id(self) -> ModelId:
        return self._model.model_id

    @property
    def memory(self) -> MemoryReport:
        return self._model.memory

    @property
    def context_length(self) -> int:
        return self._model.context_length

    @property
    def waiting(self) -> int:
        return self._model.waiting

    def count_tokens(self, request: GenerationRequest) -> int:
        """The prompt tokens of `request` (`/v1/messages/count_tokens`), where the engine can count."""
        count = getattr(self._model, "count_tokens", None)
        if count is None:
            raise RequestError(f"the engine serving '{self.model_id}' cannot count tokens", param="model")
        return int(count(request))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        first_at: float | None = None
        started = time.monotonic()
        stream = self._model.generate(request)
        try:
            async for event in stream:
                if first_at is None:
                    first_at = time.monotonic()
                    self._neuron._record_ttft(self._slot, first_at - started)
                if isinstance(event, Final) and first_at is not None:
                    self._neuron._record_rate(
                        self._slot, event.usage.completion_tokens, time.monotonic() - first_at
                    )
                yield event
        except EngineFault as e:
            self._neuron.report_fault(self._slot, e)
            raise
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    @property
    def dimensions(self) -> int:
        return self._model.dimensions if isinstance(self._model, EmbeddingModel) else 0

    async def embed(self, inputs: tuple[EmbedInput, ...], *, dimensions: int | None = None) -> Embeddings:
        if not isinstance(self._model, EmbeddingModel):
            raise RequestError(f"the model '{self.model_id}' is not an embedding model", param="model")
        try:
            return await self._model.embed(inputs, dimensions=dimensions)
        except EngineFault as e:
            self._neuron.report_fault(self._slot, e)
            raise

    async def abort(self, request_id: RequestId) -> None:
        await self._model.abort(request_id)

    async def unload(self) -> None:
        await self._neuron.unload(self._slot.entry.id)


def _measured_mb(memory: MemoryReport, fallback_mb: int) -> int:
    total = memory.total_mb
    return total if total > 0 else fallback_mb


def _describe(devices: Sequence[DeviceRecord]) -> str:
    return ", ".join(f"{d.name} {d.memory_free_mb} MB free of {d.memory_total_mb}" for d in devices)


class HardwareDevices:
    """`DeviceSource` over `mesh.hardware.Hardware` (the last sample; refresh off the loop)."""

    def __init__(self, hardware: Any) -> None:
        self._hardware = hardware

    def devices(self) -> tuple[DeviceRecord, ...]:
        last = self._hardware.last
        return tuple(last.devices) if last is not None else ()

    async def refresh(self) -> tuple[DeviceRecord, ...]:
        snapshot = await self._hardware.sample()
        return tuple(snapshot.devices)


def static_devices(
    devices: Sequence[DeviceRecord], used_mb: Callable[[], Mapping[str, int]] | None = None
) -> DeviceSource:
    """A `DeviceSource` for tests: fixed devices whose free memory is total minus `used_mb()`."""

    class _Static:
        def devices(self) -> tuple[DeviceRecord, ...]:
            used = used_mb() if used_mb is not None else {}
            return tuple(
                replace(d, memory_free_mb=max(0, d.memory_total_mb - used.get(d.name, 0))) for d in devices
            )

        async def refresh(self) -> tuple[DeviceRecord, ...]:
            return self.devices()

    return _Static()
