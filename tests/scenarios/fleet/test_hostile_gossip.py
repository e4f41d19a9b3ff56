"""Forged gossip on an open mesh (issue 12): a stranger on the LAN pushes hand-made records to an agent.

Each test reproduces one attack that got through: a forged generation that partitioned a node
(item 2), a forged record that made an agent forward a client's key and prompt to the stranger (item 3),
and a forged catalogue entry naming a local directory, or a tombstone deleting the operator's entries
(item 5).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from helexa.catalogue.store import load_catalogue
from tests.helpers.agents import TIMING, Fleet, entry
from tests.helpers.forge import Stranger, loaded, now_ms, push, record
from tests.helpers.polling import eventually

# Longer than the shrunk dead-after time: a peer whose heartbeat stopped advancing is dead by then.
PAST_DEAD_S = TIMING.dead_after_s * 1.5


@pytest.fixture
async def stranger() -> AsyncIterator[Stranger]:
    s = await Stranger.start()
    try:
        yield s
    finally:
        await s.close()


# --- item 2: a forged generation -------------------------------------------------------------------------


async def test_a_forged_generation_or_heartbeat_never_partitions_a_node(fleet: Fleet) -> None:
    a = await fleet.start("a")
    b = await fleet.start("b", peers=[a])
    await eventually(lambda: a.sees(b) and b.sees(a), what="membership")
    b_id = b.node_id
    generation = b.agent.mesh.gossip.own.generation

    def b_record(*, generation: int | None = None, version: int = 1, heartbeat: int = 0) -> dict[str, object]:
        return record(
            b_id, name="b", port=b.port, generation=generation, version=version, heartbeat=heartbeat
        )

    # Numbers no agent can have: past the wire's bound, or a start time days in this host's future.
    for forged in (2**63 - 1, 2**53 - 1, now_ms() + 10 * 86_400_000):
        status, reply = await push(fleet.http, a.url, [b_record(generation=forged)])
        assert status == 200, reply
    await asyncio.sleep(PAST_DEAD_S)
    assert a.sees(b) and b.sees(a)
    assert b.agent.mesh.gossip.own.generation == generation  # b was never moved
    assert a.agent.mesh.gossip.view[b_id].generation == generation

    # A plausible generation a little ahead (a clock that ran fast): b answers with one just above it.
    ahead = now_ms() + 60_000
    await push(fleet.http, a.url, [b_record(generation=ahead)])
    await eventually(
        lambda: a.agent.mesh.gossip.view[b_id].generation == b.agent.mesh.gossip.own.generation == ahead + 1,
        what="b's refutation at a",
    )
    # A heartbeat far ahead of b's own under b's current (generation, version): b continues from it
    # instead of looking dead to everyone holding the forged one.
    own = b.agent.mesh.gossip.own
    await push(
        fleet.http,
        a.url,
        [b_record(generation=own.generation, version=own.version, heartbeat=own.heartbeat + 1_000_000)],
    )
    await asyncio.sleep(PAST_DEAD_S)
    assert a.sees(b) and b.sees(a)
    assert b.agent.mesh.gossip.own.generation <= now_ms() + 3_600_000  # an hour: the allowed clock skew

    # And after b restarts, the two still see each other.
    await b.running.kill()
    b2 = await fleet.restart(b)
    await eventually(lambda: a.sees(b2) and b2.sees(a), what="membership after b's restart")
    await asyncio.sleep(PAST_DEAD_S)
    assert a.sees(b2) and b2.sees(a)


# --- item 3: client keys on an open mesh -------------------------------------------------------------------


async def _announce(fleet: Fleet, url: str, stop: asyncio.Event, rec: dict[str, object]) -> None:
    """Keep a forged record alive (its heartbeat advancing) until `stop`, as the stranger would."""
    beat = 0
    while not stop.is_set():
        await push(fleet.http, url, [{**rec, "heartbeat": beat}], sender=str(rec["id"]))
        beat += 1
        await asyncio.sleep(0.05)


async def test_client_keys_and_prompts_never_reach_a_stranger_announced_by_forged_gossip(
    fleet: Fleet, stranger: Stranger
) -> None:
    a = await fleet.start(
        "a", entries=[entry("org/m", options={"tokens": ["from a"]})], args=["--api-key", "secret-client-key"]
    )
    # The stranger announces itself with the model loaded: a would route the request there.
    forged = record("stranger-node", port=stranger.port, models=[loaded("org/m")])
    stop = asyncio.Event()
    announcing = asyncio.create_task(_announce(fleet, a.url, stop, forged))
    try:
        await eventually(
            lambda: a.agent.mesh.gossip.liveness("stranger-node") == "alive", what="the stranger"
        )
        headers = {"Authorization": "Bearer secret-client-key"}
        for stream in (False, True, False):
            request = {
                "model": "org/m",
                "messages": [{"role": "user", "content": "my private prompt"}],
                "stream": stream,
            }
            async with fleet.http.post(f"{a.url}/v1/chat/completions", json=request, headers=headers) as resp:
                text = await resp.text()
            assert resp.status == 200, text
            assert "from a" in text and Stranger.ANSWER not in text
    finally:
        stop.set()
        await announcing
    assert not stranger.received(b"secret-client-key") and not stranger.received(b"my private prompt"), (
        stranger.requests
    )
    assert all("/v1/" not in path for path, _, _ in stranger.requests)


async def test_agents_forward_only_to_agents_with_the_same_client_keys(fleet: Fleet) -> None:
    entries = [entry("org/m", options={"tokens": ["served"]})]
    b = await fleet.start("b", entries=entries, args=["--api-key", "k1", "--api-key", "k2"])
    # c has other keys and the most room: placement asks it first.
    c = await fleet.start("c", entries=entries, args=["--api-key", "other"], memory_mb=4000, peers=[b])
    a = await fleet.start(
        "a", entries=entries, args=["--api-key", "k2", "--api-key", "k1"], memory_mb=10, peers=[b, c]
    )
    members = (a, b, c)
    await eventually(
        lambda: all(m.sees(*(o for o in members if o is not m)) for m in members), what="membership"
    )
    request = {"model": "org/m", "messages": [{"role": "user", "content": "x"}]}
    async with fleet.http.post(
        f"{a.url}/v1/chat/completions", json=request, headers={"Authorization": "Bearer k1"}
    ) as resp:
        assert resp.status == 200, await resp.text()
    assert b.loads("org/m") == 1 and c.loads("org/m") == 0
    # c's clients are not a's: c does not forward to a or b either (it serves them itself).
    async with fleet.http.post(
        f"{c.url}/v1/chat/completions", json=request, headers={"Authorization": "Bearer other"}
    ) as resp:
        assert resp.status == 200, await resp.text()
    assert c.loads("org/m") == 1 and b.loads("org/m") == 1


# --- item 5: local paths as model sources, and removals ----------------------------------------------------

OPERATOR_TOML = """\
# the operator's models
[[models]]
id = "org/mine"
engine = "fake"
memory_mb = 100
"""


async def test_a_strangers_catalogue_never_names_local_paths_nor_deletes_the_operators_entries(
    fleet: Fleet, tmp_path: Path
) -> None:
    secret = tmp_path / "unlisted-model"
    secret.mkdir()
    a = await fleet.start("a", catalogue_toml=OPERATOR_TOML)
    assert a.catalogue is not None
    inside = a.state_dir / "models" / "shared"  # the default model root: <state dir>/models
    (a.state_dir / "models").mkdir(exist_ok=True)
    (a.state_dir / "models" / "link").symlink_to(secret)  # inside by name, outside in fact
    catalogue = [
        {"id": "evil/dir", "engine": "transformers", "source": str(secret), "version": 1},
        {"id": "evil/etc", "source": "/etc", "version": 1},
        {
            "id": "evil/dotdot",
            "source": str(a.state_dir / "models" / ".." / ".." / secret.name),
            "version": 1,
        },
        {"id": "evil/symlink", "source": str(a.state_dir / "models" / "link"), "version": 1},
        {"id": "ok/inside", "engine": "transformers", "source": str(inside), "version": 1},
        {"id": "ok/repo", "source": "org/repo", "version": 1},
        {"id": "org/mine", "version": 99, "removed": True},  # the operator's entry, removed
    ]
    stop = asyncio.Event()
    announcing = asyncio.create_task(
        _announce(fleet, a.url, stop, record("stranger-node", port=9, catalogue=catalogue))
    )
    try:
        await eventually(
            lambda: a.agent.catalogue.resolve("ok/repo") is not None, what="the stranger's entries"
        )
        await eventually(
            lambda: a.agent.catalogue.resolve("org/mine") is None, what="the removal in the view"
        )
        ids = ("evil/dir", "evil/etc", "evil/dotdot", "evil/symlink", "ok/inside")
        resolved = {i: a.agent.catalogue.resolve(i) for i in ids}
        assert resolved["ok/inside"] is not None
        assert [i for i, e in resolved.items() if i.startswith("evil/") and e is not None] == []
        listed = {e["id"] for e in (await fleet.state(a))["catalogue"]}
        assert listed == {"ok/inside", "ok/repo"}
        await a.agent.mesh.catalogue.aclose()  # every file write adoption started is done
        in_file = {e.id for e in load_catalogue(a.catalogue).entries}
        assert in_file == {"org/mine", "ok/inside", "ok/repo"}  # the removal came from a peer: file kept
    finally:
        stop.set()
        await announcing

    # The catalogue API (open on an open mesh) takes the same rules, and its refusal is the same whether
    # or not the path exists.
    messages = []
    for source in (str(secret), str(tmp_path / "no-such-dir"), "/etc", str(a.state_dir / "models" / "link")):
        status, body = await fleet.post(
            a, "/mesh/catalogue", {"id": "x/y", "engine": "transformers", "source": source}
        )
        assert status == 400, body
        messages.append(body["error"]["message"])
    assert len(set(messages)) == 1 and "model roots" in messages[0], messages
    status, body = await fleet.post(
        a, "/mesh/catalogue", {"id": "x/y", "engine": "transformers", "source": str(inside)}
    )
    assert status == 200, body
