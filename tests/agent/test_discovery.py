"""mDNS on loopback: two registrations see each other; TXT stays small; failure is never fatal."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from helexa.mesh.discovery import Discovery, GpuSummary, PeerHint, build_txt, txt_size


def _unique_type() -> str:
    return f"_hx{uuid.uuid4().hex[:8]}._tcp.local."


def test_txt_record_is_small_even_with_long_names():
    props = build_txt(
        node_id="f" * 32,
        generation=1764221000123,
        mesh="m" * 200,
        port=31313,
        gpus=GpuSummary(count=8, total_vram_mb=8 * 81920, first_name="NVIDIA H100 80GB HBM3 " * 10),
    )
    assert txt_size(props) < 400
    assert props["id"] == "f" * 32 and props["gpus"] == "8" and props["pv"] == "1"


async def test_two_registrations_on_loopback_discover_each_other():
    stype = _unique_type()
    seen: dict[str, list[PeerHint]] = {"a": [], "b": []}
    both = asyncio.Event()

    def on_peer(name: str, hint: PeerHint) -> None:
        seen[name].append(hint)
        if seen["a"] and seen["b"]:
            both.set()

    agents = {
        name: Discovery(
            node_id=f"node-{name}",
            generation=7,
            mesh="default",
            port=port,
            addresses=["127.0.0.1"],
            on_peer=lambda h, name=name: on_peer(name, h),  # type: ignore[misc]
            gpus=GpuSummary(count=1, total_vram_mb=24564, first_name="RTX 4090"),
            interfaces=["127.0.0.1"],
            service_type=stype,
        )
        for name, port in (("a", 31001), ("b", 31002))
    }
    try:
        for d in agents.values():
            assert await d.start(), d.error
        async with asyncio.timeout(20):
            await both.wait()
    finally:
        for d in agents.values():
            await d.close()
    assert {(h.node_id, h.port, h.address, h.mesh, h.generation) for h in seen["a"]} == {
        ("node-b", 31002, "127.0.0.1", "default", 7)
    }
    assert {h.node_id for h in seen["b"]} == {"node-a"}  # never itself


# zeroconf's constructor leaks the socket it opened before failing; the leak is its, the warning harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_unavailable_interface_is_not_fatal():
    d = Discovery(
        node_id="n",
        generation=1,
        mesh="default",
        port=1,
        addresses=["127.0.0.1"],
        on_peer=lambda h: None,
        interfaces=["203.0.113.77"],  # not an address of this host
        service_type=_unique_type(),
    )
    ok = await d.start()
    await d.close()
    assert ok is False and d.error
