"""Every metric family of issue 5 on two real agents after real traffic (local, forwarded, streamed, cold
loads, a failed load, a memory eviction, an idle eviction, an operator unload), parsed with
prometheus-client's own parser; and `/metrics` and `/healthz` answering while the engine is busy."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from helexa.mesh import metrics as m
from tests.helpers.agents import entry
from tests.helpers.polling import eventually

from .conftest import MIB, UTILIZATION, Mesh, Node, samples, value

# Issue 5's families: the name operators use -> (the parser's family name, type, label names).
FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "helexa_requests_total": ("helexa_requests", "counter", ("model", "node", "route", "status")),
    "helexa_request_duration_seconds": ("helexa_request_duration_seconds", "histogram", ("model", "route")),
    "helexa_time_to_first_token_seconds": (
        "helexa_time_to_first_token_seconds",
        "histogram",
        ("model", "cold"),
    ),
    "helexa_inter_token_latency_seconds": ("helexa_inter_token_latency_seconds", "histogram", ("model",)),
    "helexa_tokens_total": ("helexa_tokens", "counter", ("model", "kind")),
    "helexa_model_loads_total": ("helexa_model_loads", "counter", ("model", "result")),
    "helexa_model_load_duration_seconds": ("helexa_model_load_duration_seconds", "histogram", ("model",)),
    "helexa_model_unloads_total": ("helexa_model_unloads", "counter", ("model",)),
    "helexa_evictions_total": ("helexa_evictions", "counter", ("reason",)),
    "helexa_in_flight_requests": ("helexa_in_flight_requests", "gauge", ("model",)),
    "helexa_queued_requests": ("helexa_queued_requests", "gauge", ("model",)),
    "helexa_peers": ("helexa_peers", "gauge", ("state",)),
    "helexa_gossip_rounds_total": ("helexa_gossip_rounds", "counter", ()),
    "helexa_gossip_bytes_total": ("helexa_gossip_bytes", "counter", ()),
    "helexa_device_memory_used_bytes": ("helexa_device_memory_used_bytes", "gauge", ("device",)),
    "helexa_device_memory_total_bytes": ("helexa_device_memory_total_bytes", "gauge", ("device",)),
    "helexa_device_utilization_ratio": ("helexa_device_utilization_ratio", "gauge", ("device",)),
}
BUCKETS = {
    "helexa_request_duration_seconds": m.REQUEST_BUCKETS_S,
    "helexa_time_to_first_token_seconds": m.TTFT_BUCKETS_S,
    "helexa_inter_token_latency_seconds": m.INTER_TOKEN_BUCKETS_S,
    "helexa_model_load_duration_seconds": m.LOAD_BUCKETS_S,
}


def check_well_formed(families: dict[str, Any]) -> None:
    """Every family present with its type and label names; histograms complete and consistent."""
    for public, (name, kind, labels) in FAMILIES.items():
        assert name in families, f"{public} is missing"
        family = families[name]
        assert family.type == kind, f"{public} is a {family.type}, not a {kind}"
        assert family.documentation, f"{public} has no HELP"
        for s in family.samples:
            assert math.isfinite(s.value) and s.value >= 0, s
            if s.name.endswith("_created"):
                continue
            own = {k: v for k, v in s.labels.items() if k != "le"}
            assert tuple(sorted(own)) == tuple(sorted(labels)), f"{public}: labels {s.labels}"
        if kind == "counter":
            assert all(s.name in (f"{name}_total", f"{name}_created") for s in family.samples)
        if kind == "histogram":
            series = {tuple(sorted(s.labels.items())) for s in samples(family, "_count")}
            for key in series:
                labels_of = dict(key)
                buckets = samples(family, "_bucket", **labels_of)
                bounds = [float(s.labels["le"]) for s in buckets]
                assert bounds == [*BUCKETS[name], math.inf], f"{public}{labels_of}: buckets {bounds}"
                counts = [s.value for s in buckets]
                assert counts == sorted(counts), f"{public}{labels_of}: buckets not cumulative"
                assert counts[-1] == value(family, "_count", **labels_of)
                assert value(family, "_sum", **labels_of) >= 0


def _entries() -> list[Any]:
    words = {"tokens": ["one", " two", " three"], "token_delay_s": 0.01}
    return [
        # Fits only on b (a has 100 MB): requests to a are forwarded. one + two do not fit on b together.
        entry("org/one", memory_mb=600, options={**words, "load_delay_s": 0.05}),
        entry("org/two", memory_mb=600, options=words),
        entry("org/broken", memory_mb=50, pinned_on=("b",), options={"fail_load": "no weights here"}),
        # Served by a itself (pinned there); `brief` unloads right after its request (keep_alive = 0).
        entry("org/tiny", memory_mb=50, pinned_on=("a",), options=words),
        entry("org/brief", memory_mb=20, pinned_on=("a",), keep_alive_s=0.0, options=words),
    ]


def _status_on(viewer: Node, node: Node, model: str) -> str | None:
    """The status of `model` on `node` as `viewer` knows it (from gossip)."""
    record = viewer.agent.fleet.peers.get(node.agent.identity.node_id)
    found = record.model(model) if record is not None else None
    return found.status if found is not None else None


async def _traffic(mesh: Mesh, a: Node, b: Node) -> None:
    hi: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi there"}]
    # No SDK retries: every count below is exact.
    kw: dict[str, Any] = {"api_key": "none", "max_retries": 0, "_strict_response_validation": True}
    via_a = openai.AsyncOpenAI(base_url=f"{a.url}/v1", **kw)
    to_b = openai.AsyncOpenAI(base_url=f"{b.url}/v1", **kw)
    async with via_a, to_b:
        # 1. Cold, forwarded: a routes to b, which loads org/one.
        reply = await via_a.chat.completions.create(model="org/one", messages=hi)
        assert reply.choices[0].message.content == "one two three"
        # 2. Streamed, forwarded.
        stream = await via_a.chat.completions.create(model="org/one", messages=hi, stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == (
            "one two three"
        )
        # 3. Local on b, warm.
        reply = await to_b.chat.completions.create(model="org/one", messages=hi)
        assert reply.usage is not None and reply.usage.completion_tokens == 3
        # 4. Local on a, cold (pinned there); 5. local on a, then unloaded at once (an idle eviction).
        await via_a.chat.completions.create(model="org/tiny", messages=hi)
        await via_a.chat.completions.create(model="org/brief", messages=hi)
        await eventually(lambda: a.agent.neuron.status("org/brief") is None, what="brief unloaded")
        # 6. org/two on b evicts the idle org/one (memory).
        await to_b.chat.completions.create(model="org/two", messages=hi)
        # 7. An operator unload through a of what b holds (once a knows b holds it).
        await eventually(lambda: _status_on(a, b, "org/two") == "loaded", what="a to see org/two on b")
        async with mesh.http.post(f"{a.url}/mesh/models/unload", json={"model": "org/two"}) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["nodes"] == ["b"]
        # 8. A load that fails.
        with pytest.raises(openai.APIStatusError) as failed:
            await to_b.chat.completions.create(model="org/broken", messages=hi)
        assert failed.value.status_code == 503
        # 9. Cold and forwarded again: b loads org/one a second time (and keeps it).
        await eventually(lambda: _status_on(a, b, "org/two") is None, what="a to see org/two gone")
        reply = await via_a.chat.completions.create(model="org/one", messages=hi)
        assert reply.choices[0].message.content == "one two three"


@pytest.mark.slow
async def test_every_family_is_fed_by_the_running_agents(mesh: Mesh) -> None:
    entries = _entries()
    b = await mesh.start("b", entries=entries, memory_mb=1000)
    a = await mesh.start("a", entries=entries, memory_mb=100, peers=[b])
    await eventually(lambda: a.sees(b) and b.sees(a), what="a and b to see each other")
    await _traffic(mesh, a, b)

    async def settled() -> bool:
        # Device samples follow loads and unloads (the neuron refreshes them); gossip ran a few rounds.
        fb, fa = await mesh.scrape(b), await mesh.scrape(a)
        return (
            value(fb["helexa_device_memory_used_bytes"], device="cpu") == 600 * MIB
            and value(fa["helexa_device_memory_used_bytes"], device="cpu") == 50 * MIB
            and value(fa["helexa_gossip_rounds"], "_total") >= 3
        )

    await eventually(settled, what="device gauges to follow the loads")
    fa, fb = await mesh.scrape(a), await mesh.scrape(b)
    check_well_formed(fa)
    check_well_formed(fb)

    # --- b: the serving agent ---------------------------------------------------------------------
    req = fb["helexa_requests"]
    assert value(req, "_total", model="org/one", node="b", route="local", status="200") == 4
    assert value(req, "_total", model="org/two", node="b", route="local", status="200") == 1
    assert value(req, "_total", model="org/broken", node="b", route="local", status="503") == 1
    assert not samples(req, "_total", route="forwarded")  # b forwarded nothing
    assert value(fb["helexa_request_duration_seconds"], "_count", model="org/one", route="local") == 4
    ttft = fb["helexa_time_to_first_token_seconds"]
    # cold: the first forwarded request, org/two, and org/one again; warm: the stream and the direct one
    assert value(ttft, "_count", model="org/one", cold="true") == 2
    assert value(ttft, "_count", model="org/one", cold="false") == 2
    assert value(ttft, "_count", model="org/two", cold="true") == 1
    assert value(fb["helexa_inter_token_latency_seconds"], "_count", model="org/one") == 4 * 2
    tokens = fb["helexa_tokens"]
    assert value(tokens, "_total", model="org/one", kind="completion") == 4 * 3
    assert value(tokens, "_total", model="org/one", kind="prompt") > 0
    loads = fb["helexa_model_loads"]
    assert value(loads, "_total", model="org/one", result="ok") == 2
    assert value(loads, "_total", model="org/two", result="ok") == 1
    assert value(loads, "_total", model="org/broken", result="error") == 1
    assert value(fb["helexa_model_load_duration_seconds"], "_count", model="org/one") == 2
    unloads = fb["helexa_model_unloads"]
    assert value(unloads, "_total", model="org/one") == 1  # evicted
    assert value(unloads, "_total", model="org/two") == 1  # the operator
    assert value(fb["helexa_evictions"], "_total", reason="memory") == 1
    assert value(fb["helexa_in_flight_requests"], model="org/one") == 0
    assert value(fb["helexa_queued_requests"], model="org/one") == 0
    assert not samples(fb["helexa_in_flight_requests"], model="org/two")  # unloaded: series dropped

    # --- a: the entry agent -----------------------------------------------------------------------
    req = fa["helexa_requests"]
    assert value(req, "_total", model="org/one", node="b", route="forwarded", status="200") == 3
    assert value(req, "_total", model="org/tiny", node="a", route="local", status="200") == 1
    assert value(req, "_total", model="org/brief", node="a", route="local", status="200") == 1
    assert value(fa["helexa_request_duration_seconds"], "_count", model="org/one", route="forwarded") == 3
    assert not samples(fa["helexa_time_to_first_token_seconds"], "_count", model="org/one")  # b's to count
    assert value(fa["helexa_time_to_first_token_seconds"], "_count", model="org/tiny", cold="true") == 1
    assert value(fa["helexa_model_loads"], "_total", model="org/tiny", result="ok") == 1
    assert value(fa["helexa_model_unloads"], "_total", model="org/brief") == 1
    assert value(fa["helexa_evictions"], "_total", reason="idle") == 1
    assert value(fa["helexa_in_flight_requests"], model="org/tiny") == 0

    # --- both: mesh and devices -------------------------------------------------------------------
    for families, total_mb in ((fa, 100), (fb, 1000)):
        peers = families["helexa_peers"]
        assert (value(peers, state="alive"), value(peers, state="suspect"), value(peers, state="dead")) == (
            1,
            0,
            0,
        )
        assert value(families["helexa_gossip_rounds"], "_total") >= 3
        assert value(families["helexa_gossip_bytes"], "_total") > 0
        assert value(families["helexa_device_memory_total_bytes"], device="cpu") == total_mb * MIB
        assert value(families["helexa_device_utilization_ratio"], device="cpu") == UTILIZATION

    # The gossip counters are the gossip's own totals, not a sampled approximation.
    fa = await mesh.scrape(a)
    stats = a.agent.mesh.gossip.stats
    assert value(fa["helexa_gossip_rounds"], "_total") <= stats.rounds
    assert value(fa["helexa_gossip_bytes"], "_total") <= stats.bytes_sent + stats.bytes_received


async def test_peers_gauge_follows_membership(mesh: Mesh) -> None:
    b = await mesh.start("b", entries=[], memory_mb=100)
    a = await mesh.start("a", entries=[], memory_mb=100, peers=[b])
    await eventually(lambda: a.sees(b), what="a to see b")
    assert value((await mesh.scrape(a))["helexa_peers"], state="alive") == 1
    await b.running.kill()  # no graceful leave: a must find out from the silence

    async def dead() -> bool:
        peers = (await mesh.scrape(a))["helexa_peers"]
        return value(peers, state="dead") == 1 and value(peers, state="alive") == 0

    await eventually(dead, what="a to count b dead")


async def test_metrics_and_health_answer_while_the_engine_is_busy(mesh: Mesh) -> None:
    """Both endpoints read cached state: a load that takes a minute and a stream in flight hold nothing."""
    entries = [
        entry("org/slow-load", memory_mb=100, options={"load_delay_s": 60.0}),
        entry("org/slow-tokens", memory_mb=100, options={"tokens": ["a"] * 200, "token_delay_s": 0.05}),
    ]
    a = await mesh.start("a", entries=entries, memory_mb=1000)
    client = openai.AsyncOpenAI(base_url=f"{a.url}/v1", api_key="none", max_retries=0)
    async with client:
        stream = await client.chat.completions.create(
            model="org/slow-tokens", messages=[{"role": "user", "content": "x"}], stream=True
        )
        first = await anext(aiter(stream))
        loading = asyncio.create_task(
            client.chat.completions.create(model="org/slow-load", messages=[{"role": "user", "content": "x"}])
        )
        try:
            await eventually(lambda: a.agent.neuron.status("org/slow-load") == "loading", what="the load")
            families = await mesh.scrape(a)
            async with mesh.http.get(f"{a.url}/healthz") as resp:
                assert resp.status == 200
                health = await resp.json()
            # Answered while the load is still running and the stream still streaming.
            assert a.agent.neuron.status("org/slow-load") == "loading" and not loading.done()
            assert value(families["helexa_queued_requests"], model="org/slow-load") == 1
            assert value(families["helexa_in_flight_requests"], model="org/slow-tokens") == 1
            assert health["models_loading"] == 1 and health["models_loaded"] == 1
            assert first.choices is not None
        finally:
            loading.cancel()
            await stream.close()
            await asyncio.gather(loading, return_exceptions=True)
