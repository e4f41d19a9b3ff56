"""The catalogue as this agent knows it: its own entries and file, and the mesh-wide view it routes over.

- `LocalCatalogue`: this node's entries in their gossip form (tombstones included) and its models.toml;
  writes run in worker threads, one at a time.
- `CatalogueView`: what the cortex reads (resolve a name or alias, list the entries).
- `MeshCatalogue`: the replication. The mesh-wide catalogue is, per id, the newest version among live
  nodes' records (tombstones included) *that this agent accepts*. Newer entries seen in gossip are
  adopted into this node's catalogue *and written to its own models.toml* (when the agent reads its
  catalogue from a file), so a model added anywhere survives any one node going away, and a removal (a
  tombstone: `removed = true` with a higher version) spreads. Operator edits (`put_entry`,
  `remove_entry`) get a version above every copy in the mesh.

What it accepts from peers (and from the catalogue API), since on an open mesh anyone can gossip:
- an entry whose local `source` lies outside this agent's model roots (`<state dir>/models`,
  `model_roots`) is refused (`catalogue.validate`, the same message whether or not the path exists): it
  is not listed, not loaded, not written, and never hides an older version this agent accepts; likewise
  an entry that fails validation, or whose version is beyond the wire's counters (`MAX_COUNTER`);
- on an open mesh, a peer's tombstone removes the entry from this agent's view (the removal still
  spreads) but never from its models.toml: only this agent's own API edits remove entries from its file,
  so a stranger cannot delete the operator's entries from every file (with a mesh key, peers are members
  and their removals are written).

Pure or loop-only: no HTTP here; `mesh.peering` calls `refresh()` when records or liveness change.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from helexa.catalogue import store
from helexa.catalogue.entry import ModelEntry
from helexa.catalogue.validate import gguf_memory_mb
from helexa.mesh.errors import InvalidRequest
from helexa.mesh.fleet.codec import MAX_COUNTER
from helexa.mesh.fleet.merge import entry_version, newest_entries
from helexa.mesh.fleet.records import NodeRecord

log = logging.getLogger(__name__)

__all__ = ["CatalogueView", "LocalCatalogue", "MeshCatalogue"]

# Fields a client may send with an entry that the agent derives; never stored.
DERIVED_FIELDS = frozenset({"version", "removed", "feasible_on", "locations", "status", "loaded"})
# Parsed mesh entries are cached by their canonical bytes; the cache is cleared past this many.
PARSE_CACHE_SIZE = 4096


def canonical(entry: Mapping[str, object]) -> bytes:
    return orjson.dumps(entry, option=orjson.OPT_SORT_KEYS)


class CatalogueView:
    """What the cortex needs from the catalogue: resolve a name, list the entries."""

    def __init__(self, entries: Sequence[ModelEntry] = ()) -> None:
        self._entries: tuple[ModelEntry, ...] = ()
        self._names: dict[str, ModelEntry] = {}
        self.replace(entries)

    def replace(self, entries: Sequence[ModelEntry]) -> None:
        self._entries = tuple(entries)
        names: dict[str, ModelEntry] = {}
        # Ids first, so an alias never shadows another entry's id.
        for entry in self._entries:
            names.setdefault(entry.id, entry)
        for entry in self._entries:
            for alias in entry.aliases:
                names.setdefault(alias, entry)
        self._names = names

    @property
    def entries(self) -> tuple[ModelEntry, ...]:
        return self._entries

    def resolve(self, name: str) -> ModelEntry | None:
        return self._names.get(name)


class LocalCatalogue:
    """This node's catalogue entries in their gossip form (tombstones included), and its file.

    `path` is None when the agent was given its entries (tests): edits then live in memory only.
    Writes to the file run in worker threads, one at a time.
    """

    def __init__(self, entries: Sequence[ModelEntry], *, path: Path | None) -> None:
        self.path = path
        self.dicts: dict[str, dict[str, object]] = {e.id: store.entry_to_dict(e) for e in entries}
        # Parsed entries of this node's own file (their sources resolved against the file's folder).
        self.parsed: dict[str, ModelEntry] = {e.id: e for e in entries}
        self.write_lock = asyncio.Lock()

    def records(self) -> tuple[dict[str, object], ...]:
        return tuple(self.dicts[k] for k in sorted(self.dicts))

    async def write(self, entry_id: str, new: Mapping[str, object]) -> None:
        """Make the file hold `new` for `entry_id` (add, replace, or remove for a tombstone). Logged, never
        raised: the in-memory catalogue is what gossip carries either way."""
        if self.path is None:
            return
        path = self.path
        async with self.write_lock:
            try:
                await asyncio.to_thread(_write_entry, path, entry_id, dict(new))
            except Exception as e:
                log.warning("catalogue %s: could not write %s: %s", path, entry_id, e)


def _write_entry(path: Path, entry_id: str, new: dict[str, object]) -> None:
    """Blocking: bring `path`'s entry `entry_id` to `new` (a tombstone removes it)."""
    if new.get("removed") is True:
        store.remove_entry(path, entry_id)
        return
    fields = {k: v for k, v in new.items() if k != "removed"}
    try:
        current = store.load_catalogue(path)
        present = any(e.id == entry_id for e in current.entries)
    except FileNotFoundError:
        present = False
    if present:
        store.update_entry(path, entry_id, fields, bump_version=False, replace=True)
    else:
        store.add_entry(path, fields)


def _store_entry(path: Path, entry_id: str, fields: dict[str, object]) -> ModelEntry:
    """Blocking: add or update `entry_id` in the file (strict: refused on any problem)."""
    try:
        present = any(e.id == entry_id for e in store.load_catalogue(path).entries)
    except FileNotFoundError:
        present = False
    if present:
        return store.update_entry(path, entry_id, fields, bump_version=True, replace=True)
    return store.add_entry(path, fields)


class MeshCatalogue:
    """Replicates catalogue entries between this node's file and the mesh (see the module docstring).

    `live_records()` gives the records of live nodes (own included); `changed()` tells the fleet that this
    node's record changed (an adoption or an edit is gossiped). `roots`: the folders a local source from
    the network must be in (None: not confined); `open_mesh`: no mesh key (peers' tombstones are not
    written to the file).
    """

    def __init__(
        self,
        *,
        local: LocalCatalogue,
        view: CatalogueView,
        live_records: Callable[[], Sequence[NodeRecord]],
        changed: Callable[[], None],
        roots: Sequence[Path] | None = None,
        open_mesh: bool = False,
    ) -> None:
        self.local = local
        self.view = view
        self.roots = tuple(roots) if roots is not None else None
        self.open_mesh = open_mesh
        self._live_records = live_records
        self._changed = changed
        self._parsed: dict[bytes, ModelEntry | None] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def newest(self) -> dict[str, dict[str, object]]:
        """The mesh-wide catalogue with tombstones: per id, the newest version among live nodes' records
        that this agent accepts (`accepts`); one it refuses never hides an older one it accepts."""
        return newest_entries(self._live_records(), accept=self.accepts)

    def accepts(self, raw: Mapping[str, object]) -> bool:
        """Whether this agent takes `raw` from the mesh: a version the wire can carry, and a tombstone or
        an entry that validates here (local sources confined to the model roots)."""
        version = raw.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= MAX_COUNTER:
            return False
        return raw.get("removed") is True or self._parse(raw) is not None

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro, name=name)
        except RuntimeError:  # no loop (built outside one): nothing to run it on
            coro.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _parse(self, raw: Mapping[str, object]) -> ModelEntry | None:
        key = canonical(raw)
        if key not in self._parsed:
            eid = str(raw.get("id"))
            local = self.local.parsed.get(eid)
            if local is not None and local.version == entry_version(raw) and raw == self.local.dicts.get(eid):
                self._parsed[key] = local  # this node's own file entry (sources resolved against it)
            else:
                try:
                    self._parsed[key] = store.entry_from_dict(raw, roots=self.roots)
                except Exception as e:
                    log.warning("ignoring the catalogue entry %s from the mesh: %s", eid[:256], e)
                    self._parsed[key] = None
            if len(self._parsed) > PARSE_CACHE_SIZE:
                self._parsed.clear()
        return self._parsed[key]

    def refresh(self) -> None:
        """Recompute the mesh-wide view and adopt newer entries into this node's catalogue."""
        newest = self.newest()
        adopted = False
        for eid, winner in newest.items():
            mine = self.local.dicts.get(eid)
            if mine is not None and entry_version(mine) >= entry_version(winner):
                continue
            self.local.dicts[eid] = winner
            self.local.parsed.pop(eid, None)
            adopted = True
            if self.open_mesh and winner.get("removed") is True:
                # Anyone can gossip on an open mesh: a peer's removal changes what this agent serves
                # (while some agent carries it) but never the operator's file.
                log.info(
                    "catalogue: %s was removed by a peer (version %d); on an open mesh it stays in %s",
                    eid,
                    entry_version(winner),
                    self.local.path or "this agent's catalogue file",
                )
                continue
            log.info("catalogue: adopting %s version %d from the mesh", eid, entry_version(winner))
            self._spawn(self.local.write(eid, winner), f"write catalogue {eid}")
        entries = [
            e
            for raw in newest.values()
            if raw.get("removed") is not True and (e := self._parse(raw)) is not None
        ]
        self.view.replace(sorted(entries, key=lambda e: e.id))
        if adopted:
            self._changed()

    async def put_entry(self, raw: Mapping[str, object]) -> ModelEntry:
        """Add or update an entry (operator API): validated strictly, written to this node's file off the
        loop, with a version above every copy in the mesh, then gossiped. Raises on a bad entry."""
        fields = {k: v for k, v in raw.items() if k not in DERIVED_FIELDS}
        eid = fields.get("id")
        if not isinstance(eid, str) or not eid:
            raise InvalidRequest("the entry needs an 'id'", param="id")
        current = self.newest().get(eid)
        versions = [entry_version(e) for e in (current, self.local.dicts.get(eid)) if e]
        if current is not None and current.get("removed") is not True:
            # An update: the fields given replace those of the current entry (pinning posts a new pinned_on).
            fields = {**{k: v for k, v in current.items() if k != "version"}, **fields}
        fields = {k: v for k, v in fields.items() if v is not None}
        fields["version"] = max(versions, default=0) + 1
        # Raises InvalidEntryError on problems (a local source outside the model roots included).
        entry = store.entry_from_dict(fields, origin="request", roots=self.roots)
        if not fields.get("memory_mb") and (
            estimate := await asyncio.to_thread(gguf_memory_mb, entry.source)
        ):
            # A local GGUF file says how big it is (its header; read off the loop).
            fields["memory_mb"] = estimate
            entry = dataclasses.replace(entry, memory_mb=estimate)
        if self.local.path is not None:
            path = self.local.path
            async with self.local.write_lock:
                entry = await asyncio.to_thread(_store_entry, path, eid, fields)
        self.local.parsed[entry.id] = entry
        self.local.dicts[entry.id] = store.entry_to_dict(entry)
        self.refresh()
        self._changed()
        return entry

    async def remove_entry(self, entry_id: str) -> bool:
        """Remove an entry mesh-wide with a tombstone of a higher version. False if unknown. The file is
        written first: a disk that refuses raises `CatalogueWriteError` and nothing changes (a removal
        kept only in memory would come back from the file at the next start)."""
        current = self.newest().get(entry_id)
        if current is None or current.get("removed") is True:
            return False
        versions = [entry_version(e) for e in (current, self.local.dicts.get(entry_id)) if e]
        tombstone: dict[str, object] = {"id": entry_id, "version": max(versions) + 1, "removed": True}
        if self.local.path is not None:
            path = self.local.path
            async with self.local.write_lock:
                await asyncio.to_thread(store.remove_entry, path, entry_id)
        self.local.dicts[entry_id] = tombstone
        self.local.parsed.pop(entry_id, None)
        self.refresh()
        self._changed()
        return True

    async def aclose(self) -> None:
        """Let pending file writes finish (the agent is stopping)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
