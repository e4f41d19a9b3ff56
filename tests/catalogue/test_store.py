"""The catalogue file (tomlkit edits keep comments, atomic writes), the gossip form and the merge."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import orjson
import pytest
import tomlkit
from hypothesis import given, settings
from hypothesis import strategies as st

from helexa import catalogue
from helexa.catalogue import store
from helexa.catalogue.entry import ModelEntry
from helexa.catalogue.store import (
    Catalogue,
    CatalogueEditError,
    InvalidEntryError,
    add_entry,
    default_catalogue_text,
    ensure_catalogue,
    entry_from_dict,
    entry_to_dict,
    load_catalogue,
    remove_entry,
    update_entry,
)
from helexa.catalogue.validate import FIELDS
from tests.helpers.strategies import SHARED_MACHINE, model_entries, model_names

COMMENTED = """\
# Our fleet's models.
# Edit with care.

# The small one: always around.
[[models]]
id = "org/small"  # the id clients send
source = "org/small"
memory_mb = 1000  # measured on beast

# A big one, only on beast.
[[models]]
id = "org/big"
source = "org/big"
pinned_on = ["beast"]
# an inner comment about big
memory_mb = 40000

# Trailing notes that close the file.
# [[models]]
# id = "org/someday"
"""


@pytest.fixture
def catalogue_file(tmp_path: Path) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(COMMENTED)
    return path


# --- reading -------------------------------------------------------------------------------------------


def test_one_bad_entry_is_reported_and_the_good_ones_load(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        '[[models]]\nid = "good/one"\nsource = "good/one"\n\n'
        '[[models]]\nid = "Qwen/Qwen2.5-7B"\nsource = "Qwen/Qwen2.5-7B"\nmemory_mb = "lots"\n\n'
        '[[models]]\nid = "good/two"\nengine = "fake"\naliases = ["two"]\n'
    )
    catalogue = load_catalogue(path)
    assert catalogue.ids == ("good/one", "good/two")
    assert [str(p) for p in catalogue.problems] == [
        f'{path}: entry "Qwen/Qwen2.5-7B" field memory_mb: must be a non-negative integer, got "lots"'
    ]
    assert catalogue.resolve("two") is catalogue.resolve("good/two") is catalogue.entries[1]
    assert catalogue.resolve("Qwen/Qwen2.5-7B") is None


def test_missing_and_unparsable_files_are_problems_not_exceptions(tmp_path: Path) -> None:
    missing = load_catalogue(tmp_path / "nope.toml")
    assert missing.entries == () and missing.problems[0].message == "file not found"
    broken = tmp_path / "broken.toml"
    broken.write_text("[[models]\nid = ")
    result = load_catalogue(broken)
    assert result.entries == ()
    assert result.problems[0].message.startswith("not valid TOML")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    assert load_catalogue(binary).problems[0].message.startswith("cannot read")


def test_relative_sources_resolve_against_the_file_not_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "models.toml"
    path.write_text('[[models]]\nid = "m"\nsource = "./weights/m"\n[[models]]\nid = "n"\nsource = "tiny/n"\n')
    (tmp_path / "etc" / "tiny" / "n").mkdir(parents=True)  # an existing folder beats a repo id
    m, n = load_catalogue(path).entries
    assert m.source == str(tmp_path / "etc" / "weights" / "m")
    assert n.source == str(tmp_path / "etc" / "tiny" / "n")


def test_default_catalogue_lists_the_demo_model() -> None:
    catalogue_obj = store.parse_catalogue_text(default_catalogue_text(), file="models.toml", base_dir=None)
    assert catalogue_obj.errors == ()
    demo = catalogue_obj.resolve("helexa/demo")
    assert demo is not None
    assert (demo.engine, demo.memory_mb, demo.context_length, demo.keep_alive_s) == (
        "transformers",
        200,
        512,
        1800.0,
    )
    assert demo.source == str(Path(catalogue.__file__).parent / "demo")
    assert demo.source_spec == "builtin:demo"
    # Every field is explained in the file's comments.
    for field in FIELDS:
        assert f"#   {field}" in default_catalogue_text() or f", {field}" in default_catalogue_text(), field


def test_ensure_catalogue_creates_once(tmp_path: Path) -> None:
    path = tmp_path / "state" / "models.toml"
    assert ensure_catalogue(path) is True
    assert path.read_text() == default_catalogue_text()
    path.write_text("# mine\n")
    assert ensure_catalogue(path) is False
    assert path.read_text() == "# mine\n"


# --- writing -------------------------------------------------------------------------------------------


def test_add_keeps_every_comment_and_puts_the_entry_before_the_closing_notes(catalogue_file: Path) -> None:
    added = add_entry(
        catalogue_file, {"id": "org/new", "source": "org/new", "memory_mb": 5, "aliases": ["new"]}
    )
    assert added.version == 1 and added.aliases == ("new",)
    text = catalogue_file.read_text()
    assert text.startswith(
        COMMENTED.split("# Trailing notes", maxsplit=1)[0]
    )  # everything before is byte-identical
    assert text.index('id = "org/new"') < text.index("# Trailing notes that close the file.")
    assert text.rstrip().endswith('# id = "org/someday"')
    catalogue = load_catalogue(catalogue_file)
    assert catalogue.ids == ("org/small", "org/big", "org/new")
    assert catalogue.problems == ()


def test_remove_keeps_other_entries_comments(catalogue_file: Path) -> None:
    assert remove_entry(catalogue_file, "org/big") is True
    text = catalogue_file.read_text()
    assert "org/big" not in text
    assert "# A big one" not in text  # its own comment, directly above it, goes with it
    assert "an inner comment about big" not in text
    for kept in [
        "# Our fleet's models.",
        "# The small one",
        "# the id clients send",
        "# measured on beast",
        "# Trailing notes that close the file.",
        '# id = "org/someday"',
    ]:
        assert kept in text, kept
    assert load_catalogue(catalogue_file).ids == ("org/small",)
    assert remove_entry(catalogue_file, "org/big") is False


def test_remove_first_entry_keeps_the_file_header_and_the_rest(catalogue_file: Path) -> None:
    assert remove_entry(catalogue_file, "org/small") is True
    text = catalogue_file.read_text()
    assert text.startswith("# Our fleet's models.\n# Edit with care.\n")
    assert "# The small one" not in text and "measured on beast" not in text
    assert "# A big one, only on beast." in text and "an inner comment about big" in text
    assert "# Trailing notes that close the file." in text
    assert load_catalogue(catalogue_file).ids == ("org/big",)
    # Removing the last entry too leaves the header and the closing notes.
    assert remove_entry(catalogue_file, "org/big") is True
    text = catalogue_file.read_text()
    assert "# Our fleet's models." in text and "# Trailing notes that close the file." in text
    assert load_catalogue(catalogue_file).entries == ()
    # And the file takes new entries again.
    add_entry(catalogue_file, {"id": "org/again", "engine": "fake"})
    assert load_catalogue(catalogue_file).ids == ("org/again",)


def test_update_bumps_version_and_keeps_comments(catalogue_file: Path) -> None:
    updated = update_entry(
        catalogue_file, "org/small", {"memory_mb": 1200, "resident": True, "source": None, "engine": "fake"}
    )
    assert (updated.version, updated.memory_mb, updated.resident, updated.source) == (2, 1200, True, "")
    text = catalogue_file.read_text()
    assert 'id = "org/small"  # the id clients send' in text
    assert "# The small one: always around." in text and "# A big one, only on beast." in text
    assert 'source = "org/small"' not in text
    # A new key goes into the entry, not after the comment that introduces the next entry.
    assert text.index("resident = true") < text.index("# A big one")
    again = update_entry(catalogue_file, "org/small", {"memory_mb": 1300})
    assert again.version == 3
    adopted = update_entry(catalogue_file, "org/big", {"memory_mb": 30000, "version": 9}, bump_version=False)
    assert adopted.version == 9
    assert load_catalogue(catalogue_file).resolve("org/big") == adopted


def test_update_replace_adopts_a_gossiped_entry(catalogue_file: Path) -> None:
    peer_entry = ModelEntry(id="org/big", source="org/big-v2", memory_mb=7, version=5)  # type: ignore[arg-type]
    adopted = update_entry(
        catalogue_file, "org/big", entry_to_dict(peer_entry), bump_version=False, replace=True
    )
    assert adopted == peer_entry
    assert "pinned_on" not in catalogue_file.read_text().split("org/big")[1]


def test_update_replace_writes_only_what_changes_the_meaning(catalogue_file: Path) -> None:
    """The whole entry in its gossip form (every default spelled out) with one changed field: only that
    field and the version are written; comments and untouched keys stay byte-identical."""
    big = load_catalogue(catalogue_file).resolve("org/big")
    assert big is not None
    whole = {**entry_to_dict(big), "pinned_on": ["beast", "mini"], "version": 2}
    adopted = update_entry(catalogue_file, "org/big", whole, bump_version=False, replace=True)
    assert adopted.pinned_on == ("beast", "mini") and adopted.version == 2
    expected = COMMENTED.replace('pinned_on = ["beast"]', 'pinned_on = ["beast", "mini"]').replace(
        "memory_mb = 40000\n", "memory_mb = 40000\nversion = 2\n"
    )
    assert catalogue_file.read_text() == expected
    # A field set to the meaning it already has (a default, another spelling) is not written either.
    same = {"resident": False, "keep_alive": "1800s", "min_devices": 1, "pinned_on": []}
    update_entry(catalogue_file, "org/small", same)
    assert catalogue_file.read_text() == expected.replace(
        "memory_mb = 1000  # measured on beast\n", "memory_mb = 1000  # measured on beast\nversion = 2\n"
    )


def test_add_of_a_gossiped_entry_writes_only_what_differs_from_the_defaults(catalogue_file: Path) -> None:
    """A brand-new entry adopted whole from a peer (its gossip form spells out every default) is written
    like a hand-written one: id, source, the non-default fields and the version."""
    peer_entry = ModelEntry(
        id="org/new",  # type: ignore[arg-type]
        source="org/new",
        memory_mb=2000,
        aliases=("new",),
        keep_alive_s=600.0,
        version=3,
    )
    adopted = add_entry(catalogue_file, entry_to_dict(peer_entry))
    assert adopted == peer_entry
    assert catalogue_file.read_text() == COMMENTED.replace(
        "memory_mb = 40000\n\n",
        "memory_mb = 40000\n\n"
        "[[models]]\n"
        'id = "org/new"\n'
        'source = "org/new"\n'
        "memory_mb = 2000\n"
        'aliases = ["new"]\n'
        'keep_alive = "10m"\n'
        "version = 3\n\n",
    )
    assert load_catalogue(catalogue_file).resolve("new") == peer_entry


@settings(SHARED_MACHINE, max_examples=40)
@given(model_entries())
def test_added_entries_hold_no_defaults_and_reparse_to_the_same_entry(entry: ModelEntry) -> None:
    base = entry_to_dict(ModelEntry(id=entry.id, source="x"))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "models.toml"
        added = add_entry(path, entry_to_dict(entry))
        assert added == entry
        assert load_catalogue(path).entries == (entry,)
        (table,) = tomlkit.parse(path.read_text()).unwrap()["models"]
    assert {"id", "version"} <= table.keys()
    for key, value in table.items():
        if key not in ("id", "source", "version"):
            assert base.get(key, _MISSING) != value, key


_MISSING = object()


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda p: add_entry(p, {"id": "org/small", "source": "x/y"}), "already used"),
        (lambda p: add_entry(p, {"id": "org/x", "source": "x/y", "aliases": ["org/big"]}), "already used"),
        (lambda p: add_entry(p, {"id": "org/x", "source": "x/y", "memroy_mb": 3}), "unknown field"),
        (lambda p: add_entry(p, {"id": "org/x", "source": "x/y", "memory_mb": -3}), "non-negative"),
        (lambda p: update_entry(p, "org/none", {"memory_mb": 3}), "no such entry"),
        (lambda p: update_entry(p, "org/small", {"id": "org/other"}), "cannot change"),
        (lambda p: update_entry(p, "org/small", {"aliases": ["org/big"]}), "already used"),
    ],
)
def test_bad_edits_are_refused_and_leave_the_file_alone(catalogue_file: Path, call, fragment: str) -> None:
    with pytest.raises(CatalogueEditError) as info:
        call(catalogue_file)
    assert fragment in str(info.value)
    assert all(p.file == str(catalogue_file) for p in info.value.problems)
    assert catalogue_file.read_text() == COMMENTED


def test_add_creates_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    add_entry(
        path, {"id": "org/m", "source": "org/m", "defaults": {"top_p": 0.5}, "options": {"a": {"b": [1]}}}
    )
    (entry,) = load_catalogue(path).entries
    assert entry.defaults == {"top_p": 0.5} and entry.options == {"a": {"b": [1]}}


def test_writes_are_atomic(catalogue_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk on fire"):
        add_entry(catalogue_file, {"id": "org/new", "source": "org/new"})
    assert catalogue_file.read_text() == COMMENTED  # the old file is intact
    assert sorted(p.name for p in catalogue_file.parent.iterdir()) == ["models.toml"]  # no temp file left
    assert synced  # the data was flushed to disk before the rename

    monkeypatch.undo()
    catalogue_file.chmod(0o640)
    add_entry(catalogue_file, {"id": "org/new", "source": "org/new"})
    assert catalogue_file.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in catalogue_file.parent.iterdir()) == ["models.toml"]


# --- gossip form and merge -----------------------------------------------------------------------------


@SHARED_MACHINE
@given(model_entries())
def test_entry_dict_round_trip(entry: ModelEntry) -> None:
    data = entry_to_dict(entry)
    assert entry_from_dict(data) == entry
    assert entry_from_dict(json.loads(json.dumps(data))) == entry
    assert entry_from_dict(orjson.loads(orjson.dumps(data))) == entry
    # The dict is also a valid models.toml table.
    assert entry_from_dict(tomlkit.parse(tomlkit.dumps({"models": [data]})).unwrap()["models"][0]) == entry


def test_entry_from_dict_rejects_bad_peers() -> None:
    with pytest.raises(InvalidEntryError) as info:
        entry_from_dict({"id": "m", "source": "org/m", "memory_mb": "lots"}, origin="peer beast")
    assert (
        str(info.value) == 'peer beast: entry "m" field memory_mb: must be a non-negative integer, got "lots"'
    )
    # Keys a newer agent may send are ignored, not fatal.
    assert entry_from_dict({"id": "m", "engine": "fake", "future_field": 1}).id == "m"


@SHARED_MACHINE
@given(st.lists(model_entries(), max_size=6), st.lists(model_names(), max_size=5))
def test_catalogue_resolves_ids_before_aliases(entries, probes) -> None:
    newest = {e.id: e for e in sorted(entries, key=lambda e: e.version)}  # one entry per id
    catalogue = Catalogue.from_entries([newest[k] for k in sorted(newest)])
    for entry in catalogue:
        assert catalogue.resolve(entry.id) is entry
    for name in probes:
        found = catalogue.resolve(name)
        assert found is None or name in found.names
