"""Two and three agents on loopback with static peers: membership, forwarding, placement, /mesh/state."""

from __future__ import annotations

import asyncio

import openai

from helexa.mesh.fleet.records import ModelRecord
from tests.helpers.agents import Fleet, Member, entry
from tests.helpers.polling import eventually


def _tokens(*words: str, **options: object) -> dict[str, object]:
    return {"tokens": list(words), **options}


async def test_two_agents_see_each_other_and_forward_to_the_loaded_one(fleet: Fleet) -> None:
    entries = [entry("org/chat", options=_tokens("Hello", " mesh"), aliases=("chat",))]
    b = await fleet.start("b", entries=entries)
    a = await fleet.start("a", entries=entries, peers=[b])
    await eventually(lambda: a.sees(b) and b.sees(a), what="a and b to see each other")

    # Load on b (operator API through a, naming the node); a has nothing loaded.
    status, body = await fleet.post(a, "/mesh/models/load", {"model": "org/chat", "node": "b"})
    assert status == 200, body
    assert body["node"] == "b" and "message" in body
    assert b.loads("org/chat") == 1 and a.loads("org/chat") == 0
    await eventually(
        lambda: (
            (r := a.agent.fleet.peers.get(b.agent.identity.node_id)) is not None
            and (m := r.model("org/chat")) is not None
            and m.status == "loaded"
        ),
        what="a to learn that b has the model loaded",
    )

    client = openai.AsyncOpenAI(base_url=f"{a.url}/v1", api_key="none", _strict_response_validation=True)
    async with client:
        reply = await client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "x"}]
        )
        assert reply.choices[0].message.content == "Hello mesh"
        stream = await client.chat.completions.create(
            model="org/chat",
            messages=[{"role": "user", "content": "x"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello mesh"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2
        completion = await client.completions.create(model="org/chat", prompt="x")
        assert completion.choices[0].text == "Hello mesh"
        models = await client.models.list()
        row = next(m for m in models.data if m.id == "org/chat").model_dump()
        assert row["status"] == "loaded"
        assert sorted(row["feasible_on"]) == ["a", "b"]
        assert [(loc["node"], loc["status"]) for loc in row["locations"]] == [("b", "loaded")]
    # Served on b only: the entry agent forwarded and never loaded it.
    assert a.loads("org/chat") == 0 and b.loads("org/chat") == 1
    assert b.engine.requests_total == 3 and a.engine.requests_total == 0


async def test_mesh_state_shape(fleet: Fleet) -> None:
    entries = [entry("org/m", options=_tokens("hi"))]
    b = await fleet.start("b", entries=entries)
    a = await fleet.start("a", entries=entries, peers=[b])
    await eventually(lambda: a.sees(b) and b.sees(a), what="membership")
    state = await fleet.state(a)
    assert state["mesh"] == "default" and state["open"] is True
    assert state["self"] == a.agent.identity.node_id
    nodes = {n["name"]: n for n in state["nodes"]}
    assert set(nodes) == {"a", "b"}
    for name, n in nodes.items():
        assert n["liveness"] == "alive"
        assert n["address"] == "127.0.0.1"
        assert isinstance(n["generation"], int) and isinstance(n["id"], str)
        assert n["devices"][0]["name"] == "cpu"
        assert n["port"] == {"a": a.port, "b": b.port}[name]
    (cat,) = state["catalogue"]
    assert cat["id"] == "org/m" and sorted(cat["feasible_on"]) == ["a", "b"] and cat["locations"] == []

    # Placement among equals could pick either node: load it on b by name, then ask b.
    assert (await fleet.post(a, "/mesh/models/load", {"model": "org/m", "node": "b"}))[0] == 200
    async with fleet.http.post(
        f"{b.url}/v1/chat/completions",
        json={"model": "org/m", "messages": [{"role": "user", "content": "x"}]},
    ) as resp:
        assert resp.status == 200
    await eventually(lambda: _b_model(a, b) is not None, what="a to see b's model with its counters")
    state = await fleet.state(a)
    (model,) = next(n for n in state["nodes"] if n["name"] == "b")["models"]
    assert model["id"] == "org/m" and model["status"] == "loaded"
    assert model["requests_total"] >= 1 and model["ttft_s"] is not None
    (cat,) = state["catalogue"]
    assert [loc["node"] for loc in cat["locations"]] == [b.agent.identity.node_id]


def _b_model(a: Member, b: Member) -> ModelRecord | None:
    """The model record `a` holds for `b`, once it has a request counted and a TTFT."""
    r = a.agent.fleet.peers.get(b.agent.identity.node_id)
    m = r.model("org/m") if r is not None else None
    return m if m is not None and m.requests_total >= 1 and m.ttft_s is not None else None


async def test_cold_load_is_placed_on_the_feasible_agent(fleet: Fleet) -> None:
    entries = [entry("org/big", memory_mb=500, options=_tokens("big", " answer", load_delay_s=0.2))]
    b = await fleet.start("b", entries=entries, memory_mb=1000)
    a = await fleet.start("a", entries=entries, memory_mb=100, peers=[b])
    await eventually(lambda: a.sees(b) and b.sees(a), what="membership")
    client = openai.AsyncOpenAI(base_url=f"{a.url}/v1", api_key="none", _strict_response_validation=True)
    async with client:
        models = await client.models.list()
        assert [m.model_dump()["feasible_on"] for m in models.data] == [["b"]]
        stream = await client.chat.completions.create(
            model="org/big", messages=[{"role": "user", "content": "x"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "big answer"
    assert b.loads("org/big") == 1 and a.loads("org/big") == 0


async def test_sixty_simultaneous_first_requests_over_three_agents_cause_one_load(fleet: Fleet) -> None:
    entries = [entry("org/storm", options=_tokens("ok", load_delay_s=0.4))]
    a = await fleet.start("a", entries=entries)
    b = await fleet.start("b", entries=entries, peers=[a])
    c = await fleet.start("c", entries=entries, peers=[a, b])
    members = [a, b, c]
    await eventually(
        lambda: all(m.sees(*(o for o in members if o is not m)) for m in members), what="full membership"
    )
    clients = [
        openai.AsyncOpenAI(base_url=f"{m.url}/v1", api_key="none", max_retries=0, timeout=30) for m in members
    ]

    async def ask(i: int, stream: bool) -> str:
        client = clients[i % 3]
        if stream:
            s = await client.chat.completions.create(
                model="org/storm", messages=[{"role": "user", "content": "x"}], stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in s if c.choices])
        r = await client.chat.completions.create(
            model="org/storm", messages=[{"role": "user", "content": "x"}]
        )
        return r.choices[0].message.content or ""

    answers = await asyncio.gather(*(ask(i, i % 2 == 0) for i in range(60)))
    for client in clients:
        await client.close()
    assert answers == ["ok"] * 60
    assert sum(m.loads("org/storm") for m in members) == 1
