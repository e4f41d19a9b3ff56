"""Failures across the mesh: a serving agent dying mid-stream, graceful leave, the mesh key."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson

from tests.helpers.agents import Fleet, entry
from tests.helpers.polling import eventually


async def test_serving_agent_dying_mid_stream_gives_an_error_event_and_leaves_routing(fleet: Fleet) -> None:
    entries = [entry("org/slow", options={"tokens": ["t"] * 200, "token_delay_s": 0.02})]
    a = await fleet.start("a", entries=entries)
    b = await fleet.start("b", entries=entries, peers=[a])
    c = await fleet.start("c", entries=entries, peers=[a, b])
    members = [a, b, c]
    await eventually(
        lambda: all(m.sees(*(o for o in members if o is not m)) for m in members), what="membership"
    )
    status, body = await fleet.post(a, "/mesh/models/load", {"model": "org/slow", "node": "b"})
    assert status == 200, body
    b_id = b.agent.identity.node_id
    await eventually(
        lambda: (r := a.agent.fleet.peers.get(b_id)) is not None and r.model("org/slow") is not None,
        what="a to see the model on b",
    )

    request = {"model": "org/slow", "messages": [{"role": "user", "content": "x"}], "stream": True}
    events: list[bytes] = []
    async with fleet.http.post(f"{a.url}/v1/chat/completions", json=request) as resp:
        assert resp.status == 200
        killed_at: float | None = None
        kill: asyncio.Task[None] | None = None
        async for line in resp.content:
            if line.startswith(b"data: "):
                events.append(line[6:].strip())
            if len(events) == 5 and killed_at is None:
                killed_at = time.monotonic()
                kill = asyncio.get_running_loop().create_task(b.running.kill())
        ended_at = time.monotonic()
    assert killed_at is not None and kill is not None
    await kill
    assert ended_at - killed_at < 2.0  # promptly, not after a stall timeout
    last = orjson.loads(events[-1])
    assert "error" in last and last["error"]["code"] == "peer_failed"
    assert b"[DONE]" not in events

    # The dead agent is out of a's routing at once; the next request is served elsewhere.
    assert b_id not in {n.node_id for n in a.agent.fleet.routable_nodes()}
    request["stream"] = False
    request["max_tokens"] = 2
    async with fleet.http.post(f"{a.url}/v1/chat/completions", json=request) as resp:
        assert resp.status == 200, await resp.text()
    assert a.loads("org/slow") + c.loads("org/slow") == 1
    # c, which saw nothing fail, learns it from its failure detector.
    await eventually(lambda: c.agent.mesh.gossip.liveness(b_id) == "dead", what="c to declare b dead")


async def test_unreachable_peer_is_skipped_for_the_next_candidate(fleet: Fleet) -> None:
    entries = [entry("org/m", options={"tokens": ["ok"]})]
    a = await fleet.start("a", entries=entries, memory_mb=50)
    b = await fleet.start("b", entries=entries, peers=[a])
    c = await fleet.start("c", entries=entries, peers=[a, b])
    members = [a, b, c]
    await eventually(
        lambda: all(m.sees(*(o for o in members if o is not m)) for m in members), what="membership"
    )
    # Kill the node placement picks first (most free memory ties → lowest node id) before a notices.
    first = a.agent.cortex.place(a.agent.catalogue.resolve("org/m"), a.agent.fleet.routable_nodes())[0]
    victim, other = (b, c) if first.node_id == b.agent.identity.node_id else (c, b)
    await victim.running.kill()
    async with fleet.http.post(
        f"{a.url}/v1/chat/completions",
        json={"model": "org/m", "messages": [{"role": "user", "content": "x"}]},
    ) as resp:
        assert resp.status == 200, await resp.text()
    assert other.loads("org/m") == 1 and a.loads("org/m") == 0


async def test_graceful_leave_marks_the_node_left(fleet: Fleet) -> None:
    a = await fleet.start("a")
    b = await fleet.start("b", peers=[a])
    await eventually(lambda: a.sees(b) and b.sees(a), what="membership")
    await b.running.stop()
    b_id = b.agent.identity.node_id
    assert a.agent.mesh.gossip.liveness(b_id) == "left"
    state = await fleet.state(a)
    assert {n["name"]: n["liveness"] for n in state["nodes"]} == {"a": "alive", "b": "left"}
    assert b_id not in {n.node_id for n in a.agent.fleet.routable_nodes()}


async def test_restart_is_recognised_by_its_new_generation(fleet: Fleet, tmp_path) -> None:
    a = await fleet.start("a")
    b = await fleet.start("b", peers=[a])
    await eventually(lambda: a.sees(b), what="membership")
    b_id = b.agent.identity.node_id
    old_generation = a.agent.mesh.gossip.view[b_id].generation
    state_dir = b.agent.config.state_dir
    await b.running.kill()
    await asyncio.sleep(0.01)  # generations are start times in ms
    b2 = await fleet.start("b", peers=[a], args=["--state-dir", str(state_dir)])
    assert b2.agent.identity.node_id == b_id
    await eventually(
        lambda: (
            (r := a.agent.mesh.gossip.view.get(b_id)) is not None
            and r.generation > old_generation
            and a.agent.mesh.gossip.liveness(b_id) == "alive"
            and r.port == b2.port
        ),
        what="a to take b's new generation",
    )


async def test_mesh_key_keyless_agent_is_ignored(fleet: Fleet) -> None:
    key = ["--mesh-key", "s3cret-key"]
    a = await fleet.start("a", args=key)
    b = await fleet.start("b", peers=[a], args=key)
    c = await fleet.start("c", peers=[a, b])  # no key
    await eventually(lambda: a.sees(b) and b.sees(a), what="keyed membership")
    await asyncio.sleep(5 * 0.2)  # a few more gossip rounds
    c_id = c.agent.identity.node_id
    assert c_id not in a.agent.mesh.gossip.view and c_id not in b.agent.mesh.gossip.view
    assert set(c.agent.mesh.gossip.view) == {c_id}
    assert (await fleet.state(a))["open"] is False
    assert (await fleet.state(c))["open"] is True

    # Peer endpoints refuse unsigned requests; operator endpoints want the mesh key as a bearer.
    async with fleet.http.post(f"{a.url}/mesh/peer/gossip", data=b"{}") as resp:
        assert resp.status == 401
    status, body = await fleet.post(a, "/mesh/models/unload", {"model": "x"})
    assert status == 401 and body["error"]["type"] == "invalid_request_error"
    status, body = await fleet.post(
        a, "/mesh/models/unload", {"model": "x"}, headers={"Authorization": "Bearer s3cret-key"}
    )
    assert status == 404  # authorised; the model is unknown


async def test_forwarded_requests_in_a_keyed_mesh_with_client_api_keys(fleet: Fleet) -> None:
    entries = [entry("org/m", options={"tokens": ["ok"]})]
    args = ["--mesh-key", "k", "--api-key", "client-key"]
    b = await fleet.start("b", entries=entries, args=args)
    a = await fleet.start("a", entries=entries, args=args, memory_mb=10, peers=[b])
    await eventually(lambda: a.sees(b) and b.sees(a), what="membership")
    request = {"model": "org/m", "messages": [{"role": "user", "content": "x"}]}
    async with fleet.http.post(f"{a.url}/v1/chat/completions", json=request) as resp:
        assert resp.status == 401  # the entry agent checks the client's key
    headers = {"Authorization": "Bearer client-key"}
    async with fleet.http.post(f"{a.url}/v1/chat/completions", json=request, headers=headers) as resp:
        assert resp.status == 200, await resp.text()  # b waived the key: a proved the mesh key
    assert b.loads("org/m") == 1
    # Calling b's peer endpoint directly without a signature is refused.
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{b.url}/mesh/peer/v1/chat/completions",
            json=request,
            headers={"X-Helexa-Forwarded": "1", **headers},
        ) as resp,
    ):
        assert resp.status == 401
