"""The operator and fleet API across agents: events, load/unload, the mesh-wide catalogue, mDNS."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import orjson

from helexa.catalogue.store import load_catalogue
from helexa.mesh.peering import MeshOptions
from tests.helpers.agents import OPTIONS, Fleet, Member, entry
from tests.helpers.polling import eventually


async def _collect_events(fleet: Fleet, m: Member, out: list[dict[str, Any]], ready: asyncio.Event) -> None:
    async with fleet.http.get(f"{m.url}/mesh/events") as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for line in resp.content:
            if line.startswith(b": connected"):
                ready.set()
            elif line.startswith(b"data: "):
                out.append(orjson.loads(line[6:]))


async def test_events_deliver_membership_and_load_events(fleet: Fleet) -> None:
    entries = [entry("org/ev", options={"tokens": ["x"], "load_delay_s": 0.1})]
    a = await fleet.start("a", entries=entries)
    events: list[dict[str, Any]] = []
    ready = asyncio.Event()
    reader = asyncio.create_task(_collect_events(fleet, a, events, ready))
    try:
        await asyncio.wait_for(ready.wait(), 5)
        b = await fleet.start("b", entries=entries, peers=[a])
        await eventually(
            lambda: any(e["type"] == "join" and e["node_name"] == "b" for e in events), what="join"
        )
        status, body = await fleet.post(a, "/mesh/models/load", {"model": "org/ev", "node": "b"})
        assert status == 200, body
        status, body = await fleet.post(a, "/mesh/models/load", {"model": "org/ev", "node": "a"})
        assert status == 200, body

        def seen(kind: str, node: str) -> bool:
            return any(
                e["type"] == kind and e["node_name"] == node and e.get("model") == "org/ev" for e in events
            )

        # b's load reaches a through gossip; a's own load comes from its neuron (with its duration).
        await eventually(lambda: seen("load_done", "b") and seen("load_done", "a"), what="load events")
        own = next(e for e in events if e["type"] == "load_done" and e["node_name"] == "a")
        assert own["duration_s"] >= 0.1 and own["node"] == a.agent.identity.node_id
        status, body = await fleet.post(a, "/mesh/models/unload", {"model": "org/ev"})
        assert status == 200 and sorted(body["nodes"]) == ["a", "b"], body
        await eventually(lambda: seen("unload", "b") and seen("unload", "a"), what="unload events")
        await b.running.stop()
        await eventually(
            lambda: any(e["type"] == "leave" and e["node_name"] == "b" for e in events), what="leave"
        )
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def test_operator_load_places_and_unload_by_node(fleet: Fleet) -> None:
    entries = [entry("org/op", memory_mb=300, options={"tokens": ["x"]})]
    b = await fleet.start("b", entries=entries, memory_mb=1000)
    a = await fleet.start("a", entries=entries, memory_mb=100, peers=[b])
    await eventually(lambda: a.sees(b) and b.sees(a), what="membership")
    status, body = await fleet.post(a, "/mesh/models/load", {"model": "org/op"})
    assert status == 200 and body["node"] == "b", body
    status, body = await fleet.post(a, "/mesh/models/load", {"model": "org/op"})
    assert status == 200 and body["node"] == "b" and b.loads("org/op") == 1
    # Named node where it cannot run: the node's own refusal.
    status, body = await fleet.post(a, "/mesh/models/load", {"model": "org/op", "node": "a"})
    assert status == 503 and body["error"]["code"] == "no_room", body
    status, body = await fleet.post(a, "/mesh/models/load", {"model": "org/op", "node": "nowhere"})
    assert status == 400 and body["error"]["param"] == "node"
    status, body = await fleet.post(a, "/mesh/models/load", {"model": "org/unknown"})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, body = await fleet.post(a, "/mesh/models/unload", {"model": "org/op", "node": "b"})
    assert status == 200 and body["nodes"] == ["b"], body
    assert b.engine.unloads["org/op"] == 1  # type: ignore[index]


async def test_catalogue_add_on_one_agent_is_visible_on_another(fleet: Fleet, tmp_path: Path) -> None:
    catalogue = tmp_path / "a-models.toml"
    catalogue.write_text("# operator comment\n")
    a = await fleet.start("a", entries=None, args=["--catalogue", str(catalogue)])
    b = await fleet.start("b", peers=[a])
    c = await fleet.start("c", peers=[b])  # c knows only b at first
    await eventually(lambda: a.sees(b, c) and c.sees(a, b), what="membership through b")
    new = {
        "id": "org/added",
        "engine": "fake",
        "source": "/models/org/added",
        "memory_mb": 100,
        "options": {"tokens": ["added"], "memory_mb": 100},
    }
    status, body = await fleet.post(a, "/mesh/catalogue", new)
    assert status == 200 and body["entry"]["version"] == 1, body
    assert "# operator comment" in catalogue.read_text() and _file_entry(catalogue, "org/added") == (1, ())
    await eventually(lambda: c.agent.catalogue.resolve("org/added") is not None, what="the entry on c")
    async with fleet.http.get(f"{c.url}/mesh/catalogue") as resp:
        listed = (await resp.json())["data"]
    assert [e["id"] for e in listed] == ["org/added"] and sorted(listed[0]["feasible_on"]) == ["a", "b", "c"]
    # c can serve it (placement among all three; the answer comes back whichever serves it).
    async with fleet.http.post(f"{c.url}/v1/completions", json={"model": "org/added", "prompt": "x"}) as resp:
        assert resp.status == 200 and (await resp.json())["choices"][0]["text"] == "added"

    # An update from c wins everywhere (higher version), and a writes it to its file.
    status, body = await fleet.post(c, "/mesh/catalogue", {"id": "org/added", "aliases": ["added"]})
    assert status == 200 and body["entry"]["version"] == 2, body
    await eventually(
        lambda: (e := a.agent.catalogue.resolve("added")) is not None and e.version == 2,
        what="the update on a",
    )
    await eventually(lambda: _file_entry(catalogue, "org/added") == (2, ("added",)), what="a's file updated")

    # Removal spreads as a tombstone. On an open mesh (anyone can gossip one) a peer's removal leaves a's
    # file as it was: only a's own API removes entries from it (with a mesh key it is written: below).
    async with fleet.http.delete(f"{b.url}/mesh/catalogue/org%2Fadded") as resp:
        assert resp.status == 200, await resp.text()
    await eventually(
        lambda: all(m.agent.catalogue.resolve("org/added") is None for m in (a, b, c)),
        what="removal everywhere",
    )
    await a.agent.mesh.catalogue.aclose()  # any file write the removal started is done
    assert _file_entry(catalogue, "org/added") == (2, ("added",))
    async with fleet.http.delete(f"{b.url}/mesh/catalogue/org%2Fadded") as resp:
        assert resp.status == 404
    status, body = await fleet.post(a, "/mesh/catalogue", {"id": "org/bad", "engine": "nope"})
    assert status == 400 and "refused" in body["error"]["message"]


async def test_a_peers_removal_is_written_to_the_file_with_a_mesh_key(fleet: Fleet, tmp_path: Path) -> None:
    key = ["--mesh-key", "k"]
    operator = {"Authorization": "Bearer k"}
    catalogue = tmp_path / "a-models.toml"
    catalogue.write_text("# operator comment\n")
    a = await fleet.start("a", entries=None, args=["--catalogue", str(catalogue), *key])
    b = await fleet.start("b", peers=[a], args=key)
    await eventually(lambda: a.sees(b) and b.sees(a), what="membership")
    new = {"id": "org/added", "engine": "fake", "memory_mb": 100, "options": {"tokens": ["x"]}}
    status, body = await fleet.post(a, "/mesh/catalogue", new, headers=operator)
    assert status == 200, body
    await eventually(lambda: b.agent.catalogue.resolve("org/added") is not None, what="the entry on b")
    async with fleet.http.delete(f"{b.url}/mesh/catalogue/org%2Fadded", headers=operator) as resp:
        assert resp.status == 200, await resp.text()
    await eventually(lambda: _file_entry(catalogue, "org/added") is None, what="a's file without the entry")
    assert "# operator comment" in catalogue.read_text()


def _file_entry(path: Path, entry_id: str) -> tuple[int, tuple[str, ...]] | None:
    """(version, aliases) of `entry_id` in the catalogue file, or None."""
    found = [e for e in load_catalogue(path).entries if e.id == entry_id]
    return (found[0].version, found[0].aliases) if found else None


async def test_preload_loads_on_one_node_only(fleet: Fleet) -> None:
    entries = [entry("org/pre", options={"tokens": ["x"]}, preload=True)]
    a = await fleet.start("a", entries=entries)
    b = await fleet.start("b", entries=entries, peers=[a])
    c = await fleet.start("c", entries=entries, peers=[a, b])
    members = [a, b, c]
    await eventually(lambda: sum(m.loads("org/pre") for m in members) == 1, what="one preload")
    await asyncio.sleep(1.0)  # past every agent's settle time
    assert sum(m.loads("org/pre") for m in members) == 1


async def test_mdns_finds_peers_without_a_peer_list(fleet: Fleet) -> None:
    service = f"_hx{uuid.uuid4().hex[:8]}._tcp.local."
    options = MeshOptions(
        timing=OPTIONS.timing, mdns_interfaces=("127.0.0.1",), mdns_service_type=service, preload_settle_s=0.5
    )
    a = await fleet.start("a", options=options, mdns=True)
    b = await fleet.start("b", options=options, mdns=True)
    await eventually(lambda: a.sees(b) and b.sees(a), timeout_s=9.0, what="mDNS discovery")


_COMMENTED = """\
# operator's catalogue: every line here is theirs
[[models]]
# a small model for tests
id = "org/pin"      # the id
engine = "fake"
source = "/models/org/pin"
memory_mb = 100     # measured
keep_alive = "1800s"  # spelled in seconds on purpose
version = 3
options = {tokens = ["x"], memory_mb = 100}

# the end of the file
"""


async def test_pinning_writes_only_what_changed(fleet: Fleet, tmp_path: Path) -> None:
    """A pin (and an unpin) posted as a changed `pinned_on` rewrites that key and the version only:
    comments, spellings and untouched keys stay byte-identical, and no defaults are written."""
    catalogue = tmp_path / "models.toml"
    catalogue.write_text(_COMMENTED)
    a = await fleet.start("a", entries=None, args=["--catalogue", str(catalogue)])
    status, body = await fleet.post(a, "/mesh/catalogue", {"id": "org/pin", "pinned_on": ["a"]})
    assert status == 200 and body["entry"]["version"] == 4, body
    pinned = _COMMENTED.replace("version = 3\n", "version = 4\n").replace(
        'options = {tokens = ["x"], memory_mb = 100}\n',
        'options = {tokens = ["x"], memory_mb = 100}\npinned_on = ["a"]\n',
    )
    assert catalogue.read_text() == pinned
    status, body = await fleet.post(a, "/mesh/catalogue", {"id": "org/pin", "pinned_on": []})
    assert status == 200 and body["entry"]["version"] == 5 and "pinned_on" not in body["entry"], body
    # Unpinned: the key says so, everything else is as it was.
    unpinned = pinned.replace("version = 4\n", "version = 5\n").replace('pinned_on = ["a"]', "pinned_on = []")
    assert catalogue.read_text() == unpinned


# An engine message of several lines: the operator gets its first line (paths included), never the rest.
_CORRUPT = (
    "weights are corrupt: /models/org/broken/model.safetensors\n"
    "Traceback (most recent call last):\n"
    '  File "/srv/engine.py", line 1, in load'
)


async def test_a_failed_load_tells_the_operator_why_but_not_the_client(fleet: Fleet) -> None:
    entries = [entry("org/broken", options={"tokens": ["x"], "fail_load": _CORRUPT})]
    b = await fleet.start("b", entries=entries)
    a = await fleet.start("a", entries=entries, peers=[b])
    await eventually(lambda: a.sees(b) and b.sees(a), what="membership")
    for node in ("a", "b"):  # a's own load, and b's through the peer API
        status, body = await fleet.post(a, "/mesh/models/load", {"model": "org/broken", "node": node})
        assert status == 503 and body["error"]["code"] == "model_load_failed", body
        message = body["error"]["message"]
        assert "weights are corrupt: /models/org/broken/model.safetensors" in message, message
        assert f"on {node}" in message and "Traceback" not in message and "engine.py" not in message
    # The client API keeps the engine's message (and its paths) to itself.
    async with fleet.http.post(
        f"{a.url}/v1/completions", json={"model": "org/broken", "prompt": "x"}
    ) as resp:
        text = await resp.text()
    assert resp.status == 503 and "model_load_failed" in text, text
    assert "corrupt" not in text and "/models/" not in text
