"""Reading and writing `models.toml`, the gossip form of entries, and the mesh-wide merge.

File format (documented for operators in the packaged default, `catalogue/models.toml`): one
`[[models]]` table per entry, keys as in `catalogue.validate.FIELDS`.

Reading never raises: a missing or unparsable file, or a bad entry, becomes a `Problem` in the returned
`Catalogue`. Writing (`add_entry`, `update_entry`, `remove_entry`) edits the tomlkit document in place so
comments and the formatting of other entries survive, checks that the edit changed nothing else, and
replaces the file atomically (temp file, fsync, `os.replace`). Edits are strict: a new or changed entry
with any problem, warnings included, is refused with `CatalogueEditError`, so typos never reach the file.
A write the disk refuses (full, read-only) raises `CatalogueWriteError`, naming the file and the reason;
temp files that a killed writer left behind are recognisably ours and removed when the file is next read.

Every function here is synchronous; the agent calls the file-touching ones through `asyncio.to_thread`.
`entry_to_dict` and `entry_from_dict` are pure (apart from resolving `builtin:` paths).
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit
import tomlkit.exceptions
from tomlkit.items import AoT, Comment, Item, Null, Table, Whitespace

from .durations import format_keep_alive
from .entry import ModelEntry
from .validate import FIELDS, Problem, parse_entry, show, validate_catalogue

__all__ = [
    "Catalogue",
    "CatalogueEditError",
    "CatalogueWriteError",
    "InvalidEntryError",
    "add_entry",
    "default_catalogue_text",
    "ensure_catalogue",
    "entry_from_dict",
    "entry_to_dict",
    "load_catalogue",
    "parse_catalogue_text",
    "remove_entry",
    "remove_stale_temp_files",
    "update_entry",
]

log = logging.getLogger(__name__)

_NEW_FILE_HEADER = "helexa model catalogue: one [[models]] table per model (see the packaged default)."


class InvalidEntryError(ValueError):
    """An entry dict (from a peer or an operator) failed validation; `problems` says why."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(str(p) for p in self.problems) or "invalid entry")


class CatalogueEditError(ValueError):
    """An edit of the catalogue file was refused; the file is unchanged. `problems` says why."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(str(p) for p in self.problems) or "edit refused")


@dataclass(frozen=True, kw_only=True, slots=True)
class Catalogue:
    """Validated entries plus the problems found. `resolve` maps ids and aliases to entries.

    Built from a file (`load_catalogue`) or from merged gossip (`Catalogue.from_entries`). When two entries
    claim one name (possible after a mesh-wide merge), ids win over aliases and earlier entries over later
    ones, so resolution is deterministic.
    """

    entries: tuple[ModelEntry, ...] = ()
    problems: tuple[Problem, ...] = ()
    path: Path | None = None
    _index: dict[str, ModelEntry] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[str, ModelEntry] = {}
        for entry in self.entries:
            index.setdefault(entry.id, entry)
        for entry in self.entries:
            for alias in entry.aliases:
                index.setdefault(alias, entry)
        object.__setattr__(self, "_index", index)

    @classmethod
    def from_entries(cls, entries: Iterable[ModelEntry], *, path: Path | None = None) -> Catalogue:
        return cls(entries=tuple(entries), path=path)

    def resolve(self, name: str) -> ModelEntry | None:
        """The entry whose id or alias is `name`, or None."""
        return self._index.get(name)

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(e.id for e in self.entries)

    @property
    def errors(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "error")


# --- reading -------------------------------------------------------------------------------------------


def parse_catalogue_text(text: str, *, file: str, base_dir: Path | None) -> Catalogue:
    """Parse and validate catalogue text (the pure part of `load_catalogue`)."""
    try:
        data = tomlkit.parse(text).unwrap()
    except tomlkit.exceptions.TOMLKitError as exc:
        return Catalogue(
            problems=(Problem(file=file, entry=None, field=None, message=f"not valid TOML: {exc}"),)
        )
    entries, problems = validate_catalogue(data, file=file, base_dir=base_dir)
    return Catalogue(entries=entries, problems=problems)


def load_catalogue(path: str | os.PathLike[str]) -> Catalogue:
    """Read and validate `path`. Never raises for a missing, unreadable or unparsable file: that is a
    problem in the result (and no entries). Relative sources resolve against the file's folder. Temp files
    that a writer killed mid-write left beside it are removed first (`remove_stale_temp_files`)."""
    file_path = Path(path).expanduser().absolute()
    file = str(path)
    remove_stale_temp_files(file_path)
    try:
        text = file_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        problem = Problem(file=file, entry=None, field=None, message="file not found")
        return Catalogue(problems=(problem,), path=file_path)
    except (OSError, UnicodeDecodeError) as exc:
        problem = Problem(file=file, entry=None, field=None, message=f"cannot read: {exc}")
        return Catalogue(problems=(problem,), path=file_path)
    catalogue = parse_catalogue_text(text, file=file, base_dir=file_path.parent)
    for problem in catalogue.problems:
        log.log(logging.ERROR if problem.severity == "error" else logging.WARNING, "catalogue: %s", problem)
    return Catalogue(entries=catalogue.entries, problems=catalogue.problems, path=file_path)


def default_catalogue_text() -> str:
    """The packaged default `models.toml`."""
    return importlib.resources.files("helexa.catalogue").joinpath("models.toml").read_text(encoding="utf-8")


def ensure_catalogue(path: str | os.PathLike[str]) -> bool:
    """Create `path` from the packaged default when it does not exist (agent start). True if created."""
    file_path = Path(path).expanduser()
    if file_path.exists():
        return False
    try:
        file_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CatalogueWriteError(file_path, exc) from exc
    _atomic_write_text(file_path, default_catalogue_text())
    log.info("created catalogue %s from the packaged default", file_path)
    return True


# --- the gossip form -----------------------------------------------------------------------------------


def entry_to_dict(entry: ModelEntry) -> dict[str, object]:
    """A plain JSON-able dict with the keys of `models.toml` (what gossip and `/mesh/state` carry).

    `entry_from_dict(entry_to_dict(e)) == e` for every validated entry. `builtin:` sources travel in their
    portable spelling; other local paths travel absolute. Unset optional fields and empty collections are
    left out.
    """
    out: dict[str, object] = {
        "id": entry.id,
        "engine": entry.engine,
        "source": entry.source_spec if entry.source_spec is not None else entry.source,
    }
    if entry.engine == "fake" and not entry.source and entry.source_spec is None:
        del out["source"]
    if entry.task != "generate":
        out["task"] = entry.task
    if entry.revision is not None:
        out["revision"] = entry.revision
    if entry.quant is not None:
        out["quant"] = entry.quant
    out["memory_mb"] = entry.memory_mb
    out["min_devices"] = entry.min_devices
    out["min_device_memory_mb"] = entry.min_device_memory_mb
    if entry.pinned_on:
        out["pinned_on"] = list(entry.pinned_on)
    out["resident"] = entry.resident
    if entry.aliases:
        out["aliases"] = list(entry.aliases)
    out["keep_alive"] = format_keep_alive(entry.keep_alive_s)
    out["preload"] = entry.preload
    if entry.context_length is not None:
        out["context_length"] = entry.context_length
    if entry.defaults:
        out["defaults"] = dict(entry.defaults)
    out["version"] = entry.version
    if entry.options:
        out["options"] = json.loads(json.dumps(entry.options))
    return out


def entry_from_dict(
    data: Mapping[str, object], *, origin: str = "peer", roots: Sequence[Path] | None = None
) -> ModelEntry:
    """Validate an entry dict that came from a peer (or the operator API) exactly like a file entry.

    Raises `InvalidEntryError` on any error; warnings (keys a newer agent may know) are ignored. `origin`
    names where it came from in the problems (a peer's name or address). `roots`: the folders a local
    source must be in (`catalogue.validate.within_roots`; None: not confined).
    """
    entry, problems = parse_entry(data, file=origin, index=1, base_dir=None, roots=roots)
    if entry is None:
        raise InvalidEntryError(p for p in problems if p.severity == "error")
    return entry


def _canonical(entry: ModelEntry) -> str:
    return json.dumps(entry_to_dict(entry), sort_keys=True, separators=(",", ":"))


# --- writing -------------------------------------------------------------------------------------------

_locks_guard = threading.Lock()
_locks: dict[str, threading.Lock] = {}


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise read-modify-write cycles on one file within this process."""
    key = os.path.abspath(path)
    with _locks_guard:
        lock = _locks.setdefault(key, threading.Lock())
    with lock:
        yield


class CatalogueWriteError(OSError):
    """The catalogue file could not be written (a full disk, a read-only folder, no permission). An
    `OSError` with the cause's errno; its message names the file and the reason, e.g. "cannot write the
    catalogue /var/lib/helexa/models.toml: no space left on device"."""

    def __init__(self, path: Path, cause: OSError) -> None:
        reason = cause.strerror or str(cause) or type(cause).__name__
        super().__init__(cause.errno, reason)
        self.path = path
        self.reason = reason[:1].lower() + reason[1:]

    def __str__(self) -> str:
        return f"cannot write the catalogue {self.path}: {self.reason}"


# Temp files of an atomic write are named `.<file>.<writer pid>.<random>.tmp`, so a writer that died
# between writing and renaming (SIGKILL, power loss) leaves a file that is recognisably ours and says whose
# it was. `remove_stale_temp_files` (run when the catalogue is read: at start and before every edit)
# removes those of writers that no longer run. A write takes milliseconds: a leftover younger than this is
# spared anyway, in case its writer lives in another PID namespace sharing the folder (a container).
STALE_TEMP_MIN_AGE_S = 10.0
# ...and one this old is stale even if its pid is alive again (pids are reused).
STALE_TEMP_MAX_AGE_S = 3600.0


def _temp_pattern(path: Path) -> re.Pattern[str]:
    # The pid is optional: older versions named them `tempfile.mkstemp`'s way, `.<file>.<random>.tmp`.
    return re.compile(rf"\.{re.escape(path.name)}\.(?:(\d+)\.)?[A-Za-z0-9_]{{6,}}\.tmp")


def _process_exists(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    return True


def remove_stale_temp_files(path: str | os.PathLike[str], *, now: float | None = None) -> list[Path]:
    """Remove the temp files that writers of `path` left behind when they died mid-write; returns them.
    Never raises (a folder that cannot be listed or written is left as it is)."""
    file_path = Path(path).expanduser().absolute()
    pattern = _temp_pattern(file_path)
    now = time.time() if now is None else now
    removed: list[Path] = []
    try:
        names = os.listdir(file_path.parent)
    except OSError:
        return removed
    for name in names:
        match = pattern.fullmatch(name)
        if match is None:
            continue
        temp = file_path.parent / name
        try:
            age_s = now - temp.lstat().st_mtime
            pid = int(match.group(1)) if match.group(1) else 0
            if age_s < STALE_TEMP_MIN_AGE_S or (_process_exists(pid) and age_s < STALE_TEMP_MAX_AGE_S):
                continue
            temp.unlink()
        except OSError:
            continue
        removed.append(temp)
    if removed:
        log.warning(
            "removed %d temp file(s) that an interrupted write of %s left behind: %s",
            len(removed),
            file_path,
            ", ".join(p.name for p in removed),
        )
    return removed


def _atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so a reader sees the old file or the new one, never a torn one, even across a
    crash: temp file in the same folder, fsync, `os.replace`, fsync of the folder. Keeps the file's mode.
    Raises `CatalogueWriteError` (naming the file and the reason, e.g. a full disk); nothing is left
    behind then."""
    directory = path.parent
    try:
        mode: int | None = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise CatalogueWriteError(path, exc) from exc
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise CatalogueWriteError(path, exc) from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        if isinstance(exc, OSError):
            raise CatalogueWriteError(path, exc) from exc
        raise
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened and synced
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _edit_problem(
    path: Path, entry: str | int | None, message: str, field: str | None = None
) -> CatalogueEditError:
    return CatalogueEditError([Problem(file=str(path), entry=entry, field=field, message=message)])


def _read_document(path: Path) -> tomlkit.TOMLDocument:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        doc = tomlkit.document()
        doc.add(tomlkit.comment(_NEW_FILE_HEADER))
        doc.add(tomlkit.nl())
        return doc
    except (OSError, UnicodeDecodeError) as exc:
        raise _edit_problem(path, None, f"cannot read: {exc}") from exc
    try:
        return tomlkit.parse(text)
    except tomlkit.exceptions.TOMLKitError as exc:
        raise _edit_problem(path, None, f"not valid TOML, fix it by hand first: {exc}") from exc


def _models_aot(doc: tomlkit.TOMLDocument, path: Path) -> AoT | None:
    if "models" not in doc:
        return None
    models = doc.item("models")
    if not isinstance(models, AoT):
        raise _edit_problem(path, None, "entries must be [[models]] tables to be edited", field="models")
    return models


def _raw_models(doc: tomlkit.TOMLDocument) -> list[Any]:
    data = doc.unwrap()
    models = data.get("models", [])
    return list(models) if isinstance(models, list) else []


def _find(aot: AoT | None, entry_id: str) -> int | None:
    if aot is None:
        return None
    for index, table in enumerate(aot.body):
        if table.get("id") == entry_id:
            return index
    return None


def _toml_value(value: object) -> Any:
    """Plain value → tomlkit item; tables inside an entry are written inline (`defaults = {top_p = 0.9}`)."""
    if isinstance(value, Mapping):
        table = tomlkit.inline_table()
        for key, item in value.items():
            table[str(key)] = _toml_value(item)
        return table
    if isinstance(value, list | tuple):
        array = tomlkit.array()
        for item in value:
            array.append(_toml_value(item))
        return array
    return value


def _pop_trailing_trivia(container: Table | tomlkit.TOMLDocument) -> list[Item]:
    """Remove and return the comments and blank lines that end a table. In a `[[models]]` table they
    describe what follows (the next entry, or the file's closing comments), not the table itself."""
    body = container.value.body if isinstance(container, Table) else container.body
    trailing: list[Item] = []
    while body and body[-1][0] is None and isinstance(body[-1][1], Comment | Whitespace | Null):
        trailing.insert(0, body.pop()[1])
    return trailing


def _split_leading_comment(trivia: list[Item]) -> tuple[list[Item], list[Item]]:
    """Split trivia into (rest, comment block directly above the next header, with no blank line)."""
    cut = len(trivia)
    while cut > 0:
        item = trivia[cut - 1]
        if isinstance(item, Comment) or (isinstance(item, Whitespace) and "\n" not in item.s):
            cut -= 1
            continue
        if isinstance(item, Null):
            cut -= 1
            continue
        break
    return trivia[:cut], trivia[cut:]


def _add_trivia(table: Table, trivia: Iterable[Item]) -> None:
    for item in trivia:
        if isinstance(item, Comment | Whitespace):
            table.value.add(item)


def _check_names(
    path: Path, entry: ModelEntry, others: Iterable[ModelEntry], raw_ids: Iterable[object]
) -> list[Problem]:
    """Problems when `entry`'s id or aliases collide with another entry's names."""
    taken: dict[str, str] = {}
    for other in others:
        for name in other.names:
            taken.setdefault(name, other.id)
    for raw_id in raw_ids:
        if isinstance(raw_id, str):
            taken.setdefault(raw_id, raw_id)
    problems: list[Problem] = []
    file = str(path)
    if entry.id in taken:
        problems.append(
            Problem(
                file=file,
                entry=entry.id,
                field="id",
                message=f"already used by entry {show(taken[entry.id])}",
            )
        )
    for alias in entry.aliases:
        if alias in taken:
            problems.append(
                Problem(
                    file=file,
                    entry=entry.id,
                    field="aliases",
                    message=f"alias {show(alias)} already used by entry {show(taken[alias])}",
                )
            )
    return problems


def _validate_strict(path: Path, raw: Mapping[str, object], index: int) -> ModelEntry:
    entry, problems = parse_entry(raw, file=str(path), index=index, base_dir=path.parent)
    if problems or entry is None:
        raise CatalogueEditError(problems)
    return entry


def _commit(path: Path, doc: tomlkit.TOMLDocument, expected_models: list[Any]) -> None:
    """Write `doc` after checking that its entries are exactly `expected_models` (the guard that keeps
    comment surgery from ever changing another entry)."""
    text = doc.as_string()
    reparsed = tomlkit.parse(text).unwrap()
    if reparsed.get("models", []) != expected_models:
        raise _edit_problem(
            path, None, "internal error: the edit would change other entries; file left as it was"
        )
    _atomic_write_text(path, text)


def _ordered(raw: Mapping[str, object]) -> dict[str, object]:
    known = [k for k in FIELDS if k in raw]
    return {k: raw[k] for k in [*known, *(k for k in raw if k not in FIELDS)]}


_ALWAYS_WRITTEN: frozenset[str] = frozenset({"id", "source", "version"})


def _without_defaults(path: Path, raw: dict[str, object], new: ModelEntry, index: int) -> dict[str, object]:
    """`raw` without the keys that only restate a default (`min_devices = 1`, `resident = false`,
    `keep_alive = "30m"`, `defaults = {}`, ...), so an entry adopted from a peer's gossip form reads like a
    hand-written one. `id`, `source` and `version` always stay. A key is dropped only when the entry
    without it parses cleanly to exactly `new`, so the file means the same either way."""
    out = dict(raw)
    for key in list(raw):
        if key in _ALWAYS_WRITTEN:
            continue
        trial = {k: v for k, v in out.items() if k != key}
        trimmed, problems = parse_entry(trial, file=str(path), index=index, base_dir=path.parent)
        if trimmed is not None and not problems and trimmed == new:
            out = trial
    return out


def add_entry(path: str | os.PathLike[str], entry: Mapping[str, object]) -> ModelEntry:
    """Append a new `[[models]]` table for `entry` (keys as in models.toml; `version` defaults to 1).

    Only `id`, `source`, `version` and the keys that differ from their defaults are written (an entry
    adopted whole from gossip does not spell out every default); the table re-parses to the same entry.
    Refused (`CatalogueEditError`, file untouched) when the entry has any problem or its id or an alias is
    already used. Creates the file when it does not exist. Returns the validated entry.
    """
    file_path = Path(path).expanduser().absolute()
    raw = {k: v for k, v in entry.items() if v is not None}
    raw.setdefault("version", 1)
    raw = _ordered(raw)
    with _file_lock(file_path):
        doc = _read_document(file_path)
        aot = _models_aot(doc, file_path)
        models = _raw_models(doc)
        new = _validate_strict(file_path, raw, len(models) + 1)
        raw = _without_defaults(file_path, raw, new, len(models) + 1)
        current = parse_catalogue_text(doc.as_string(), file=str(file_path), base_dir=file_path.parent)
        problems = _check_names(
            file_path, new, current.entries, (m.get("id") for m in models if isinstance(m, dict))
        )
        if problems:
            raise CatalogueEditError(problems)
        table = tomlkit.table()
        for key, value in raw.items():
            table[key] = _toml_value(value)
        if aot is None or len(aot) == 0:
            if aot is not None:
                doc.remove("models")
            doc.append("models", tomlkit.aot())
            aot = _models_aot(doc, file_path)
            assert aot is not None
            aot.append(table)
        else:
            footer = _pop_trailing_trivia(aot[-1])
            aot[-1].value.add(tomlkit.ws("\n"))
            aot.append(table)
            _add_trivia(aot[-1], footer)
        _commit(file_path, doc, [*models, json.loads(json.dumps(raw))])
    log.info("catalogue %s: added %s (version %d)", file_path, new.id, new.version)
    return new


_ABSENT = object()


def _minimal_change(
    path: Path, old_raw: dict[str, object], new_raw: dict[str, object], new: ModelEntry, index: int
) -> dict[str, object]:
    """`new_raw` cut down to what changes the entry's meaning: keys that mean the same as in the file
    (`keep_alive = "1800s"` for "30m", a default written out or left out) keep the file's spelling;
    changed keys take the value given (`pinned_on = []` for an unpin), or are removed when not given; the
    version is always the new one. A pin posted with the whole entry then rewrites `pinned_on` and
    `version` only. Falls back to `new_raw` when the file's entry does not parse or the cut-down entry
    would mean something else."""
    old, _problems = parse_entry(old_raw, file=str(path), index=index, base_dir=path.parent)
    if old is None:
        return new_raw
    before, after = entry_to_dict(old), entry_to_dict(new)
    out = dict(old_raw)
    for key in {*before, *after, *old_raw, *new_raw} - {"id", "version"}:
        if before.get(key, _ABSENT) == after.get(key, _ABSENT):
            continue  # the same meaning: the file's spelling (or absence) stays
        if key in new_raw:
            out[key] = new_raw[key]
        else:
            out.pop(key, None)
    out["version"] = new_raw["version"]
    minimal, problems = parse_entry(out, file=str(path), index=index, base_dir=path.parent)
    if minimal is None or problems or entry_to_dict(minimal) != after:
        return new_raw
    return out


def update_entry(
    path: str | os.PathLike[str],
    entry_id: str,
    changes: Mapping[str, object],
    *,
    bump_version: bool = True,
    replace: bool = False,
) -> ModelEntry:
    """Change fields of the entry `entry_id` in place (comments on untouched keys survive).

    A value of None removes the key. `replace=True` makes `changes` the whole entry (keys it lacks are
    removed), which is how an agent adopts a newer entry from gossip. The version becomes
    `max(old + 1, changes["version"])` with `bump_version`, else `changes["version"]` (or the old one).
    The id cannot change. Refused (`CatalogueEditError`, file untouched) on any problem.
    """
    file_path = Path(path).expanduser().absolute()
    with _file_lock(file_path):
        doc = _read_document(file_path)
        aot = _models_aot(doc, file_path)
        index = _find(aot, entry_id)
        if aot is None or index is None:
            raise _edit_problem(file_path, entry_id, "no such entry")
        models = _raw_models(doc)
        old_raw: dict[str, object] = dict(models[index])
        if "id" in changes and changes["id"] != entry_id:
            raise _edit_problem(file_path, entry_id, "the id cannot change; add a new entry instead", "id")
        new_raw: dict[str, object] = {"id": entry_id} if replace else dict(old_raw)
        for key, value in changes.items():
            if value is None:
                new_raw.pop(key, None)
            else:
                new_raw[key] = value
        old_version = old_raw.get("version", 1)
        old_version = old_version if isinstance(old_version, int) and not isinstance(old_version, bool) else 1
        requested = changes.get("version")
        if bump_version:
            floor = requested if isinstance(requested, int) and not isinstance(requested, bool) else 0
            new_raw["version"] = max(old_version + 1, floor)
        elif requested is None:
            new_raw["version"] = old_version
        new_raw = _ordered(new_raw)
        new = _validate_strict(file_path, new_raw, index + 1)
        new_raw = _minimal_change(file_path, old_raw, new_raw, new, index + 1)
        current = parse_catalogue_text(doc.as_string(), file=str(file_path), base_dir=file_path.parent)
        others = [e for e in current.entries if e.id != entry_id]
        other_ids = (m.get("id") for i, m in enumerate(models) if i != index and isinstance(m, dict))
        problems = _check_names(file_path, new, others, other_ids)
        if problems:
            raise CatalogueEditError(problems)

        table = aot[index]
        expected = json.loads(json.dumps(new_raw))
        for key in list(table.keys()):
            if key not in new_raw:
                del table[key]
        trailing: list[Item] | None = None
        for key, value in new_raw.items():
            if key in table:
                if table[key] != value or type(table.unwrap()[key]) is not type(value):
                    table[key] = _toml_value(value)
            else:
                if trailing is None:
                    trailing = _pop_trailing_trivia(table)
                table[key] = _toml_value(value)
        if trailing is not None:
            _add_trivia(table, trailing)
        _commit(file_path, doc, [*models[:index], expected, *models[index + 1 :]])
    log.info("catalogue %s: updated %s (version %d)", file_path, new.id, new.version)
    return new


def remove_entry(path: str | os.PathLike[str], entry_id: str) -> bool:
    """Remove the entry `entry_id` and the comment block directly above it (no blank line between);
    other comments, including the ones after it, stay. False when there is no such entry."""
    file_path = Path(path).expanduser().absolute()
    with _file_lock(file_path):
        if not file_path.exists():
            return False
        doc = _read_document(file_path)
        aot = _models_aot(doc, file_path)
        index = _find(aot, entry_id)
        if aot is None or index is None:
            return False
        models = _raw_models(doc)
        following = _pop_trailing_trivia(aot[index])
        if index > 0:
            before, _own_comment = _split_leading_comment(_pop_trailing_trivia(aot[index - 1]))
            _add_trivia(aot[index - 1], [*before, *following])
            del aot[index]
        else:
            doc = _rebuild_without_first(doc, following)
        _commit(file_path, doc, [*models[:index], *models[index + 1 :]])
    log.info("catalogue %s: removed %s", file_path, entry_id)
    return True


def _rebuild_without_first(doc: tomlkit.TOMLDocument, following: list[Item]) -> tomlkit.TOMLDocument:
    """A copy of `doc` without the first `[[models]]` table: the comment block directly above it goes too
    (unless it is the file's opening comment), and `following` (what came after it) takes its place."""
    new = tomlkit.document()
    prefix: list[Item] = []
    for key, item in doc.body:
        if key is None:
            prefix.append(item)
            continue
        if key.key == "models" and isinstance(item, AoT):
            rest, _own_comment = _split_leading_comment(prefix)
            # The block directly above the table is its own comment, unless it opens the file.
            kept = rest if any(isinstance(i, Comment) for i in rest) else prefix
            for trivia in [*kept, *following]:
                if isinstance(trivia, Comment | Whitespace):
                    new.add(trivia)
            prefix = []
            if len(item) > 1:
                remaining = tomlkit.aot()
                for table in item.body[1:]:
                    remaining.append(table)
                new.append("models", remaining)
            continue
        for trivia in prefix:
            if isinstance(trivia, Comment | Whitespace):
                new.add(trivia)
        prefix = []
        new.append(key, item)
    for trivia in prefix:
        if isinstance(trivia, Comment | Whitespace):
            new.add(trivia)
    return new
