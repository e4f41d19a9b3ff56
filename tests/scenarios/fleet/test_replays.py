"""Replays of signed peer requests on a keyed mesh (issue 12, item 4): a request captured on its way to
one agent is refused by every other agent, and by the same agent after a restart."""

from __future__ import annotations

from typing import Any

from tests.helpers.agents import Fleet, entry
from tests.helpers.polling import eventually

KEY = ["--mesh-key", "s3cret-mesh-key"]
OPERATOR = {"Authorization": "Bearer s3cret-mesh-key"}


async def test_a_captured_peer_request_works_once_on_its_target_and_nowhere_else(fleet: Fleet) -> None:
    entries = [entry("org/m", options={"tokens": ["x"]})]
    a = await fleet.start("a", entries=entries, args=KEY)
    b = await fleet.start("b", entries=entries, args=KEY, peers=[a])
    c = await fleet.start("c", entries=entries, args=KEY, peers=[a, b])
    members = (a, b, c)
    await eventually(
        lambda: all(m.sees(*(o for o in members if o is not m)) for m in members), what="membership"
    )

    # Capture what a signs on its way to b: an operator's load placed on b.
    captured: list[tuple[str, bytes, dict[str, str]]] = []
    auth = a.agent.mesh.auth
    sign = auth.sign

    def spy(method: str, path_qs: str, body: bytes, **kw: Any) -> dict[str, str]:
        headers: dict[str, str] = sign(method, path_qs, body, **kw)
        if path_qs == "/mesh/peer/load":
            captured.append((path_qs, body, dict(headers)))
        return headers

    auth.sign = spy
    status, reply = await fleet.post(
        a, "/mesh/models/load", {"model": "org/m", "node": "b"}, headers=OPERATOR
    )
    assert status == 200 and b.loads("org/m") == 1, reply
    path, payload, headers = captured[-1]

    async def replay(url: str) -> int:
        async with fleet.http.post(f"{url}{path}", data=payload, headers=headers) as resp:
            return resp.status

    assert await replay(b.url) == 401  # the agent it was for: a replay
    assert await replay(c.url) == 401  # another agent of the mesh
    assert await replay(a.url) == 401
    assert c.loads("org/m") == 0 and a.loads("org/m") == 0

    # b restarts (the same node, a new run): the request it once accepted is refused.
    await b.running.kill()
    b2 = await fleet.start("b", entries=entries, args=KEY, peers=[a], port=b.port, state_dir=b.state_dir)
    assert b2.node_id == b.node_id
    assert await replay(b2.url) == 401
    assert b2.loads("org/m") == 0

    # The mesh still works across the restart: a's requests to b reach its new run.
    await eventually(lambda: a.sees(b2) and b2.sees(a), what="membership after b's restart")
    status, reply = await fleet.post(
        a, "/mesh/models/load", {"model": "org/m", "node": "b"}, headers=OPERATOR
    )
    assert status == 200 and b2.loads("org/m") == 1, reply
