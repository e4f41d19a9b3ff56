"""`mesh.fleet.catalogue.LocalCatalogue`: how an agent writes entries it adopts from the mesh to its own
file."""

from __future__ import annotations

from pathlib import Path

from helexa.catalogue.entry import ModelEntry
from helexa.catalogue.store import entry_to_dict, load_catalogue
from helexa.mesh.fleet.catalogue import LocalCatalogue

HAND_WRITTEN = """\
# Our models.
[[models]]
id = "org/small"  # the one we always keep
source = "org/small"
memory_mb = 1000
"""


async def test_adopting_a_new_entry_writes_it_like_a_hand_written_one(tmp_path: Path) -> None:
    """A peer's entry arrives in its gossip form (every default spelled out); the file gets only id, source,
    the non-default fields and the version, and reads back as the same entry."""
    path = tmp_path / "models.toml"
    path.write_text(HAND_WRITTEN)
    (small,) = load_catalogue(path).entries
    local = LocalCatalogue([small], path=path)
    peer_entry = ModelEntry(
        id="org/new",  # type: ignore[arg-type]
        engine="fake",
        source="org/new",
        pinned_on=("beast",),
        preload=True,
        defaults={"temperature": 0.2},
        version=4,
    )
    gossiped = entry_to_dict(peer_entry)
    assert {"min_devices", "resident", "keep_alive", "memory_mb"} <= gossiped.keys()
    await local.write("org/new", gossiped)
    assert path.read_text() == HAND_WRITTEN + (
        "\n"
        "[[models]]\n"
        'id = "org/new"\n'
        'engine = "fake"\n'
        'source = "org/new"\n'
        'pinned_on = ["beast"]\n'
        "preload = true\n"
        "defaults = {temperature = 0.2}\n"
        "version = 4\n"
    )
    assert load_catalogue(path).entries == (small, peer_entry)
