"""The local model manager over the fake engine: single-flight loads, eviction, keep-alive, failures."""

from __future__ import annotations

import asyncio

import pytest

from helexa.engine.base import Delta, Final, GenerationRequest, ModelId, RequestId
from helexa.engine.errors import EngineFault
from helexa.mesh import errors
from helexa.mesh.routing.neuron import NeuronEvent
from tests.helpers.agents import entry

from .conftest import Rig


async def _drain_unloads(rig: Rig) -> None:
    """Let background unload tasks finish."""
    for _ in range(100):
        await asyncio.sleep(0.01)
        if not any(r.status == "unloading" for r in rig.neuron.records()):
            return


async def test_twenty_simultaneous_first_requests_cause_one_load(rig: Rig) -> None:
    e = entry("a", options={"load_delay_s": 0.05})
    models = await asyncio.gather(*(rig.neuron.ensure_loaded(e) for _ in range(20)))
    assert rig.engine.load_attempts[ModelId("a")] == 1
    assert rig.neuron.loads_started == 1
    assert len({id(m) for m in models}) == 1
    record = rig.neuron.record("a")
    assert record is not None and record.status == "loaded" and record.memory_mb == 100
    assert 'helexa_model_loads_total{model="a",result="ok"} 1.0' in rig.metrics.render().decode()


async def test_twenty_simultaneous_acquires_one_load_and_counters_return_to_zero(rig: Rig) -> None:
    e = entry("a", options={"load_delay_s": 0.05, "tokens": ["x", "y"]})
    seen_queued: list[int] = []

    async def one(i: int) -> str:
        async with rig.neuron.acquire(e) as model:
            out = []
            async for ev in model.generate(GenerationRequest(request_id=RequestId(f"r{i}"), prompt="hi")):
                if isinstance(ev, Delta):
                    out.append(ev.text)
            return "".join(out)

    tasks = [asyncio.create_task(one(i)) for i in range(20)]
    await asyncio.sleep(0.01)
    rec = rig.neuron.record("a")
    assert rec is not None and rec.status == "loading"
    seen_queued.append(rec.queued)
    # Some clients give up while the model loads: their reservations must not leak.
    for t in tasks[:5]:
        t.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert seen_queued == [20]
    assert sum(isinstance(r, asyncio.CancelledError) for r in results) == 5
    assert [r for r in results if isinstance(r, str)] == ["xy"] * 15
    assert rig.engine.load_attempts[ModelId("a")] == 1
    rec = rig.neuron.record("a")
    assert rec is not None and (rec.in_flight, rec.queued, rec.status) == (0, 0, "loaded")


async def test_loads_of_different_models_do_not_block_loaded_ones(rig: Rig) -> None:
    fast = entry("fast")
    slow = entry("slow", options={"load_delay_s": 0.5})
    await rig.neuron.ensure_loaded(fast)
    slow_task = asyncio.create_task(rig.neuron.ensure_loaded(slow))
    await asyncio.sleep(0.02)
    assert rig.neuron.status("slow") == "loading"
    async with rig.neuron.acquire(fast) as model:
        events = [ev async for ev in model.generate(GenerationRequest(request_id=RequestId("r"), prompt="p"))]
    assert isinstance(events[-1], Final)
    assert rig.neuron.status("slow") == "loading"  # the fast model answered while slow was still loading
    await slow_task


async def test_eviction_unloads_lru_idle_non_resident(rig: Rig) -> None:
    events: list[NeuronEvent] = []
    rig.neuron.on_event.append(events.append)
    a, b, c = entry("a", memory_mb=400), entry("b", memory_mb=400), entry("c", memory_mb=400)
    await rig.neuron.ensure_loaded(a)
    await asyncio.sleep(0.01)
    await rig.neuron.ensure_loaded(b)
    await asyncio.sleep(0.01)
    async with rig.neuron.acquire(a):  # a is now the most recently used; b is the LRU
        pass
    await rig.neuron.ensure_loaded(c)
    await _drain_unloads(rig)
    assert rig.neuron.status("b") is None
    assert rig.neuron.status("a") == "loaded"
    assert rig.neuron.status("c") == "loaded"
    assert rig.engine.unloads[ModelId("b")] == 1
    assert [ev.model for ev in events if ev.kind == "evicted"] == ["b"]
    assert 'helexa_evictions_total{reason="memory"} 1.0' in rig.metrics.render().decode()


async def test_eviction_skips_resident_and_in_flight_models(rig: Rig) -> None:
    a = entry("a", memory_mb=400, resident=True)
    b = entry("b", memory_mb=400)
    c = entry("c", memory_mb=400)
    await rig.neuron.ensure_loaded(a)
    await rig.neuron.ensure_loaded(b)
    async with rig.neuron.acquire(b):
        # a is resident and b has a request in flight: nothing may be evicted, c does not fit.
        with pytest.raises(errors.ModelUnavailable) as info:
            await rig.neuron.ensure_loaded(c)
        assert info.value.reason == "insufficient_memory"
        assert rig.neuron.status("b") == "loaded"
    assert rig.engine.unloads[ModelId("a")] == 0 and rig.engine.unloads[ModelId("b")] == 0
    # Once b is idle again, c evicts b (the only idle non-resident model), never the resident a.
    await asyncio.sleep(0.1)  # past the failed-load back-off for c
    await rig.neuron.ensure_loaded(c)
    await _drain_unloads(rig)
    assert rig.neuron.status("a") == "loaded"
    assert rig.neuron.status("b") is None
    assert rig.neuron.status("c") == "loaded"


async def test_model_larger_than_the_device_is_unavailable(rig: Rig) -> None:
    with pytest.raises(errors.ModelUnavailable):
        await rig.neuron.ensure_loaded(entry("huge", memory_mb=5000))
    assert rig.engine.load_attempts[ModelId("huge")] == 0


async def test_keep_alive_zero_unloads_right_after_the_last_request(rig: Rig) -> None:
    e = entry("a", keep_alive_s=0.0)
    async with rig.neuron.acquire(e):
        async with rig.neuron.acquire(e):
            pass
        assert rig.neuron.status("a") == "loaded"  # one request still in flight
    await _drain_unloads(rig)
    assert rig.neuron.status("a") is None
    assert rig.engine.unloads[ModelId("a")] == 1


async def test_keep_alive_idle_unload_by_the_reaper(rig: Rig) -> None:
    short = entry("short", keep_alive_s=0.05)
    never = entry("never", keep_alive_s=None)
    reaper = asyncio.create_task(rig.neuron.run_reaper())
    try:
        async with rig.neuron.acquire(short):
            pass
        async with rig.neuron.acquire(never):
            pass
        await asyncio.sleep(0.3)
        await _drain_unloads(rig)
    finally:
        reaper.cancel()
    assert rig.neuron.status("short") is None
    assert rig.neuron.status("never") == "loaded"


async def test_failed_load_is_reported_backs_off_then_reloads(rig: Rig) -> None:
    e = entry("a", options={"fail_load": "network down", "fail_load_kind": "transient", "fail_load_times": 1})
    results = await asyncio.gather(*(rig.neuron.ensure_loaded(e) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, errors.ModelLoadFailed) for r in results)
    assert rig.engine.load_attempts[ModelId("a")] == 1
    record = rig.neuron.record("a")
    assert record is not None and record.status == "failed" and record.error == "network down"
    # Within the back-off: answered from the recorded failure, no new attempt.
    with pytest.raises(errors.ModelLoadFailed) as info:
        await rig.neuron.ensure_loaded(e)
    assert info.value.retry_after_s is not None
    assert rig.engine.load_attempts[ModelId("a")] == 1
    await asyncio.sleep(0.1)
    await rig.neuron.ensure_loaded(e)
    assert rig.engine.load_attempts[ModelId("a")] == 2
    assert rig.neuron.status("a") == "loaded"
    text = rig.metrics.render().decode()
    assert 'helexa_model_loads_total{model="a",result="error"} 1.0' in text
    assert 'helexa_model_loads_total{model="a",result="ok"} 1.0' in text


async def test_structural_failure_is_not_retried_in_a_hot_loop(rig: Rig) -> None:
    e = entry("bad", options={"fail_load": "no config.json", "fail_load_kind": "source"})
    for _ in range(10):
        with pytest.raises(errors.ModelLoadFailed):
            await rig.neuron.ensure_loaded(e)
        await asyncio.sleep(0.01)
    assert rig.engine.load_attempts[ModelId("bad")] == 1


async def test_engine_fault_marks_failed_unloads_and_reloads(rig: Rig) -> None:
    e = entry("a", options={"fail_after_tokens": 1})
    with pytest.raises(EngineFault):
        async with rig.neuron.acquire(e) as model:
            async for _ in model.generate(GenerationRequest(request_id=RequestId("r1"), prompt="p")):
                pass
    record = rig.neuron.record("a")
    assert record is not None and record.status == "failed" and record.in_flight == 0
    await asyncio.sleep(0.05)
    assert rig.engine.unloads[ModelId("a")] == 1
    # The next request loads it again.
    await rig.neuron.ensure_loaded(e)
    assert rig.engine.loads[ModelId("a")] == 2
    assert rig.neuron.status("a") == "loaded"


async def test_explicit_unload_waits_for_in_flight_requests(rig: Rig) -> None:
    e = entry("a")
    async with rig.neuron.acquire(e):
        unload = asyncio.create_task(rig.neuron.unload("a"))
        await asyncio.sleep(0.05)
        assert not unload.done()
        assert rig.engine.unloads[ModelId("a")] == 0
    assert await unload is True
    assert rig.neuron.status("a") is None
    assert rig.engine.unloads[ModelId("a")] == 1


async def test_wait_idle_returns_when_requests_finish(rig: Rig) -> None:
    e = entry("a")
    await rig.neuron.wait_idle()  # nothing loaded: returns at once
    release = asyncio.Event()

    async def hold() -> None:
        async with rig.neuron.acquire(e):
            await release.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0.05)
    waiter = asyncio.create_task(rig.neuron.wait_idle(poll_s=0.01))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    release.set()
    await asyncio.wait_for(waiter, 1.0)
    await holder
