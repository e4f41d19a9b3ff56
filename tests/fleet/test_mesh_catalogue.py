"""`mesh.fleet.catalogue.MeshCatalogue`: which catalogue changes from peers an agent accepts (issue 12,
item 5): local sources confined to its model roots, versions the wire can carry, and on an open mesh no
peer's removal written to its file."""

from __future__ import annotations

from pathlib import Path

import pytest

from helexa.catalogue.store import load_catalogue
from helexa.mesh.fleet.catalogue import CatalogueView, LocalCatalogue, MeshCatalogue
from helexa.mesh.fleet.records import NodeId, NodeRecord

OWN = """\
[[models]]
id = "org/mine"
source = "org/mine"
"""


def _peer(*entries: dict[str, object]) -> NodeRecord:
    return NodeRecord(
        node_id=NodeId("peer"), name="peer", generation=1, version=1, heartbeat=0, address="10.0.0.2", port=1,
        catalogue=tuple(entries),
    )  # fmt: skip


async def _catalogue(tmp_path: Path, peer: NodeRecord, *, open_mesh: bool) -> tuple[MeshCatalogue, Path]:
    path = tmp_path / "models.toml"
    path.write_text(OWN)
    entries = load_catalogue(path).entries
    local = LocalCatalogue(entries, path=path)
    view = CatalogueView(entries)

    def records() -> list[NodeRecord]:
        own = NodeRecord(
            node_id=NodeId("me"), name="me", generation=1, version=1, heartbeat=0, address="10.0.0.1", port=1,
            catalogue=local.records(),
        )  # fmt: skip
        return [own, peer]

    mesh = MeshCatalogue(
        local=local,
        view=view,
        live_records=records,
        changed=lambda: None,
        roots=[tmp_path / "roots"],
        open_mesh=open_mesh,
    )
    mesh.refresh()
    await mesh.aclose()
    return mesh, path


async def test_a_refused_newer_entry_never_hides_an_older_accepted_one(tmp_path: Path) -> None:
    peer = _peer(
        {"id": "org/mine", "source": "/etc", "version": 5},  # newer, but outside the roots
        {"id": "org/huge", "source": "org/huge", "version": 2**60},  # a version the wire cannot carry on
        {"id": "org/ok", "source": str(tmp_path / "roots" / "ok"), "version": 1},
    )
    mesh, path = await _catalogue(tmp_path, peer, open_mesh=True)
    mine = mesh.view.resolve("org/mine")
    assert mine is not None and mine.source == "org/mine" and mine.version == 1
    assert mesh.view.resolve("org/huge") is None and mesh.view.resolve("org/ok") is not None
    assert {e.id for e in load_catalogue(path).entries} == {"org/mine", "org/ok"}
    # Versions for this agent's own edits come from what it accepts: its edit wins over the refused one
    # at every agent that refuses it too, and stays a number the wire can carry.
    entry = await mesh.put_entry({"id": "org/huge", "source": "org/huge2"})
    assert entry.version == 1


@pytest.mark.parametrize("open_mesh", [True, False])
async def test_a_peers_removal_reaches_the_file_only_with_a_mesh_key(tmp_path: Path, open_mesh: bool) -> None:
    mesh, path = await _catalogue(
        tmp_path, _peer({"id": "org/mine", "version": 9, "removed": True}), open_mesh=open_mesh
    )
    assert mesh.view.resolve("org/mine") is None  # either way, the removal is in the view
    in_file = {e.id for e in load_catalogue(path).entries}
    assert in_file == ({"org/mine"} if open_mesh else set())
