"""Validation: raw TOML tables (or gossiped dicts) → `ModelEntry`, or `Problem`s that say what is wrong.

Every problem names the file, the entry (its id, or its 1-based position when it has no usable id) and the
field, so an operator can find it:

    models.toml: entry "Qwen/Qwen2.5-7B" field memory_mb: must be a non-negative integer, got "lots"

Severity `error` means the entry is skipped; `warning` means it is kept and something in it was ignored
(an unknown key, a duplicate alias). Nothing here raises on bad input: a bad entry never takes the agent
down. The only I/O is a check whether a local source path exists next to the catalogue file (to tell a
relative path from a Hugging Face repo id, for the operator's own file only), whether a `builtin:` model
is installed, resolving symbolic links when a source is confined, and reading the header of a local GGUF
file when the operator's own entry leaves `memory_mb` out (`engine.gguf.memory_mb_estimate`).

Confinement (`roots`): entries that come over the network (a peer's gossip, the catalogue API) may name a
local path only inside one of the agent's model roots (`<state dir>/models` and `model_roots`), after
every symbolic link is resolved; anything else is refused with one message that does not depend on what
exists on disk (a stranger on an open mesh once had any directory loaded, and learnt from the errors
which ones exist). The operator's own `models.toml` is configuration, like `helexa.toml`, and is not
confined. `builtin:` sources and repo ids are not paths; the `fake` engine (tests) reads no source.
"""

from __future__ import annotations

import difflib
import importlib.resources
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final, Literal

from helexa.engine.base import ModelId
from helexa.engine.errors import ModelSourceError
from helexa.engine.gguf import is_gguf_source, memory_mb_estimate, read_header

from .durations import parse_keep_alive
from .entry import DEFAULT_KEEP_ALIVE_S, EngineChoice, ModelEntry, Task

__all__ = [
    "DEFAULTS_FIELDS",
    "ENGINES",
    "FIELDS",
    "TASKS",
    "Problem",
    "Severity",
    "builtin_path",
    "check_name",
    "gguf_memory_mb",
    "parse_entry",
    "resolve_source",
    "validate_catalogue",
    "within_roots",
]

Severity = Literal["error", "warning"]

# Every key an entry may have, in the order the catalogue file writes them.
FIELDS: Final = (
    "id",
    "engine",
    "task",
    "source",
    "revision",
    "quant",
    "memory_mb",
    "min_devices",
    "min_device_memory_mb",
    "pinned_on",
    "resident",
    "aliases",
    "keep_alive",
    "preload",
    "context_length",
    "defaults",
    "version",
    "options",
)
ENGINES: Final[tuple[EngineChoice, ...]] = ("auto", "mlc", "transformers", "fake")
TASKS: Final[tuple[Task, ...]] = ("generate", "embed")
# Default sampling keys and their allowed ranges (checked in `_parse_defaults`).
DEFAULTS_FIELDS: Final = ("temperature", "top_p", "top_k", "max_tokens")
MAX_NAME_LEN: Final = 256

_HF_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
# One GGUF file in a hub repo: `org/name:path/in/repo/file.gguf`.
_HF_GGUF = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}:(?!/)(?!.*\.\./)[A-Za-z0-9._/-]{1,250}\.gguf",
    re.IGNORECASE,
)
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_BUILTIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_INT64 = (-(2**63), 2**63 - 1)


@dataclass(frozen=True, kw_only=True, slots=True)
class Problem:
    """One thing wrong with a catalogue.

    `entry`: the entry's id (str), its 1-based position (int) when it has no usable id, or None for a
    problem with the file as a whole. `field`: the key at fault (`defaults.top_p` for nested ones), or None.
    """

    file: str
    entry: str | int | None
    field: str | None
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        where = f"{self.file}:"
        if isinstance(self.entry, str):
            where += f' entry "{self.entry}"'
        elif isinstance(self.entry, int):
            where += f" entry #{self.entry}"
        if self.field is not None:
            where += f" field {self.field}"
        if where.endswith(":"):
            return f"{where} {self.message}"
        return f"{where}: {self.message}"


def show(value: object) -> str:
    """A short rendering of a bad value for messages (TOML spelling where there is one)."""
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, Sequence):
        return "an array"
    if value is None:
        return "nothing"
    return f"a {type(value).__name__}"


def check_name(value: object) -> str | None:
    """Why `value` cannot be a model id or alias, or None when it can. Names reach URLs, logs and maps,
    never file paths, but are kept safe anyway: no `..`, no leading `/`, printable, at most 256 chars."""
    if not isinstance(value, str):
        return f"must be a string, got {show(value)}"
    if not value:
        return "must not be empty"
    if len(value) > MAX_NAME_LEN:
        return f"must be at most {MAX_NAME_LEN} characters, got {len(value)}"
    if not value.isprintable():
        return f"must contain only printable characters, got {show(value)}"
    if value != value.strip():
        return f"must not start or end with whitespace, got {show(value)}"
    if value.startswith("/"):
        return f"must not start with '/', got {show(value)}"
    if ".." in value:
        return f"must not contain '..', got {show(value)}"
    if "\\" in value:
        return f"must not contain a backslash, got {show(value)}"
    return None


def builtin_path(name: str) -> Path:
    """Where the package keeps the shipped model `name` (`builtin:demo` → `<package>/catalogue/demo`)."""
    return Path(str(importlib.resources.files("helexa.catalogue").joinpath(name)))


OUTSIDE_ROOTS: Final = (
    "a local path must be inside one of this agent's model roots (its state directory's models folder, "
    "or model_roots in helexa.toml)"
)


def within_roots(path: str, roots: Sequence[Path]) -> bool:
    """Whether `path`, every symbolic link resolved, lies inside (or is) one of `roots` (resolved alike)."""
    try:
        real = os.path.realpath(path)
        for root in roots:
            base = os.path.realpath(root)
            if os.path.commonpath([real, base]) == base:
                return True
    except (OSError, ValueError):  # a NUL byte, a path too long, a loop of links
        return False
    return False


def resolve_source(
    text: str, *, base_dir: Path | None, roots: Sequence[Path] | None = None
) -> tuple[str, str | None]:
    """Resolve a catalogue `source` to `(source, source_spec)`. Raises ValueError with a message.

    - `builtin:NAME` → the package directory `catalogue/NAME`, spec `builtin:NAME`;
    - `HF://org/name` (MLC weights repo) and `org/name` (Hugging Face repo id) → kept as written, unless a
      local path of that name exists next to the catalogue file;
    - `org/name:file.gguf` (one GGUF file of a hub repo) → kept as written;
    - anything else is a local path: `~` is expanded and a relative path is made absolute against
      `base_dir` (the catalogue file's folder), never against the working directory. With `roots` (an
      entry from the network) it must lie inside one of them (`within_roots`), else `OUTSIDE_ROOTS`.
    """
    if not text or text != text.strip():
        raise ValueError(f"must be a non-empty path or repo id without surrounding spaces, got {show(text)}")
    if text.startswith("builtin:"):
        name = text.removeprefix("builtin:")
        if not _BUILTIN_NAME.fullmatch(name) or ".." in name:
            raise ValueError(f"builtin:NAME needs a plain directory name, got {show(text)}")
        return str(builtin_path(name)), f"builtin:{name}"
    if text[:5].upper() == "HF://":
        if not _HF_REPO.fullmatch(text[5:]):
            raise ValueError(f"HF:// must be followed by org/name, got {show(text)}")
        return text, None
    if _HF_GGUF.fullmatch(text):
        return text, None
    if _URL_SCHEME.match(text):
        raise ValueError(
            "must be a local path, org/name, org/name:file.gguf, HF://org/name or builtin:NAME, "
            f"got {show(text)}"
        )
    explicit_path = text.startswith(("/", "~", "./", "../")) or text in {".", ".."}
    is_repo = not explicit_path and _HF_REPO.fullmatch(text) is not None
    if is_repo and (base_dir is None or not (base_dir / text).exists()):
        return text, None
    path = Path(text).expanduser()
    if not path.is_absolute():
        if base_dir is None:
            raise ValueError(f"relative path {show(text)} needs a catalogue file to resolve against")
        path = base_dir / path
    resolved = os.path.normpath(path)
    if roots is not None and not within_roots(resolved, roots):
        raise ValueError(OUTSIDE_ROOTS)
    return resolved, None


def gguf_memory_mb(source: str) -> int | None:
    """`engine.gguf.memory_mb_estimate` of a local GGUF file; None for any other source or a file that
    cannot be read (the load reports that, with the reason)."""
    if not is_gguf_source(source) or not os.path.isfile(source):
        return None
    try:
        return memory_mb_estimate(read_header(Path(source)))
    except ModelSourceError:
        return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)  # type: ignore[arg-type]


def _json_problem(value: object, where: str, depth: int = 0) -> str | None:
    """Why `value` cannot travel as JSON in gossip (options are passed through untouched)."""
    if depth > 32:
        return f"{where}: nested too deeply"
    if value is None or isinstance(value, bool | str):
        return None
    if _is_int(value):
        return None if _INT64[0] <= value <= _INT64[1] else f"{where}: integer out of 64-bit range"  # type: ignore[operator]
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where}: must be a finite number"
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{where}: keys must be strings, got {show(key)}"
            problem = _json_problem(item, f"{where}.{key}", depth + 1)
            if problem:
                return problem
        return None
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            problem = _json_problem(item, f"{where}[{i}]", depth + 1)
            if problem:
                return problem
        return None
    return f"{where}: {show(value)} cannot reach an engine (only strings, numbers, booleans, arrays, tables)"


def _plain(value: object) -> object:
    """A plain-Python copy (lists and dicts) of a JSON-able value, so entries never share tomlkit items."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class _EntryParser:
    """Parses one raw table, collecting problems instead of raising."""

    def __init__(
        self,
        raw: Mapping[object, object],
        *,
        file: str,
        index: int,
        base_dir: Path | None,
        roots: Sequence[Path] | None = None,
    ) -> None:
        self.raw = raw
        self.file = file
        self.base_dir = base_dir
        self.roots = roots
        raw_id = raw.get("id")
        self.label: str | int = raw_id if isinstance(raw_id, str) and check_name(raw_id) is None else index
        self.problems: list[Problem] = []

    def error(self, field: str | None, message: str) -> None:
        self.problems.append(Problem(file=self.file, entry=self.label, field=field, message=message))

    def warn(self, field: str | None, message: str) -> None:
        self.problems.append(
            Problem(file=self.file, entry=self.label, field=field, message=message, severity="warning")
        )

    @property
    def failed(self) -> bool:
        return any(p.severity == "error" for p in self.problems)

    def int_field(self, key: str, *, minimum: int, what: str) -> int | None:
        value = self.raw[key]
        if not _is_int(value) or value < minimum or value > _INT64[1]:  # type: ignore[operator]
            self.error(key, f"must be {what}, got {show(value)}")
            return None
        return value  # type: ignore[return-value]

    def bool_field(self, key: str) -> bool | None:
        value = self.raw[key]
        if not isinstance(value, bool):
            self.error(key, f"must be true or false, got {show(value)}")
            return None
        return value

    def str_field(self, key: str) -> str | None:
        value = self.raw[key]
        if not isinstance(value, str) or not value.strip():
            self.error(key, f"must be a non-empty string, got {show(value)}")
            return None
        return value

    def names_field(self, key: str, *, check: bool) -> tuple[str, ...] | None:
        value = self.raw[key]
        if isinstance(value, str) or not isinstance(value, list | tuple):
            self.error(key, f"must be an array of strings, got {show(value)}")
            return None
        names: list[str] = []
        for item in value:
            reason = check_name(item) if check else None
            if not isinstance(item, str) or not item.strip():
                self.error(key, f"must be an array of non-empty strings, got {show(item)} in it")
                return None
            if reason is not None:
                self.error(key, f"{show(item)}: {reason}")
                return None
            if item in names:
                self.warn(key, f"{show(item)} is listed twice; the repeat is ignored")
                continue
            names.append(item)
        return tuple(names)

    def parse(self) -> ModelEntry | None:
        raw = self.raw
        fields: dict[str, object] = {}
        for key in raw:
            if key not in FIELDS:
                shown = key if isinstance(key, str) and key.isprintable() else repr(key)
                hint = _did_you_mean(shown)
                self.warn(shown, f"unknown field (ignored){hint}")

        if "id" not in raw:
            self.error("id", "is required")
        else:
            reason = check_name(raw["id"])
            if reason is not None:
                self.error("id", reason)
            else:
                fields["id"] = ModelId(raw["id"])  # type: ignore[arg-type]

        engine: object = raw.get("engine", "auto")
        if engine not in ENGINES:
            self.error("engine", f"must be one of {', '.join(ENGINES)}, got {show(engine)}")
        else:
            fields["engine"] = engine

        task: object = raw.get("task", "generate")
        if task not in TASKS:
            self.error("task", f"must be one of {', '.join(TASKS)}, got {show(task)}")
        elif task == "embed" and engine == "mlc":
            self.error("task", "embedding models run on the transformers engine, not mlc")
        else:
            fields["task"] = task

        if "source" in raw:
            source = raw["source"]
            if not isinstance(source, str):
                self.error("source", f"must be a string, got {show(source)}")
            else:
                # The fake engine (tests) never opens its source: nothing to confine.
                roots = None if engine == "fake" else self.roots
                try:
                    fields["source"], spec = resolve_source(source, base_dir=self.base_dir, roots=roots)
                except ValueError as exc:
                    self.error("source", str(exc))
                else:
                    if engine == "mlc" and is_gguf_source(source):
                        self.error("source", "a GGUF file loads with the transformers engine, not mlc")
                    if spec is not None:
                        fields["source_spec"] = spec
                        if not Path(str(fields["source"])).is_dir():
                            self.warn("source", f"{spec} is not installed here (no {fields['source']})")
        elif engine == "fake":
            fields["source"] = ""
        else:
            self.error(
                "source",
                "is required (a local path, org/name, org/name:file.gguf, HF://org/name or builtin:NAME)",
            )

        for key in ("revision", "quant"):
            if key in raw and (text := self.str_field(key)) is not None:
                fields[key] = text
        for key, minimum, what in (
            ("memory_mb", 0, "a non-negative integer"),
            ("min_devices", 1, "an integer >= 1"),
            ("min_device_memory_mb", 0, "a non-negative integer"),
            ("context_length", 1, "an integer >= 1"),
            ("version", 1, "an integer >= 1"),
        ):
            if key in raw and (number := self.int_field(key, minimum=minimum, what=what)) is not None:
                fields[key] = number
        if "memory_mb" not in raw and self.roots is None and isinstance(fields.get("source"), str):
            # The operator's own file (read off the loop): a local GGUF file says how big it is.
            estimate = gguf_memory_mb(str(fields["source"]))
            if estimate is not None:
                fields["memory_mb"] = estimate
        for key in ("resident", "preload"):
            if key in raw and (flag := self.bool_field(key)) is not None:
                fields[key] = flag
        if "pinned_on" in raw and (nodes := self.names_field("pinned_on", check=False)) is not None:
            fields["pinned_on"] = nodes
        if "aliases" in raw and (aliases := self.names_field("aliases", check=True)) is not None:
            if "id" in fields and fields["id"] in aliases:
                self.warn("aliases", f"{show(fields['id'])} is the entry's own id; ignored")
                aliases = tuple(a for a in aliases if a != fields["id"])
            fields["aliases"] = aliases

        if "keep_alive" in raw:
            try:
                fields["keep_alive_s"] = parse_keep_alive(raw["keep_alive"])
            except ValueError as exc:
                self.error("keep_alive", f"{exc}, got {show(raw['keep_alive'])}")
        else:
            fields["keep_alive_s"] = DEFAULT_KEEP_ALIVE_S

        if "defaults" in raw and (defaults := self.parse_defaults()) is not None:
            fields["defaults"] = defaults
        if "options" in raw:
            options = raw["options"]
            if not isinstance(options, Mapping):
                self.error("options", f"must be a table, got {show(options)}")
            elif (reason := _json_problem(options, "options")) is not None:
                self.error("options", reason)
            else:
                fields["options"] = _plain(options)

        if self.failed:
            return None
        return ModelEntry(**fields)  # type: ignore[arg-type]

    def parse_defaults(self) -> dict[str, float | int] | None:
        value = self.raw["defaults"]
        if not isinstance(value, Mapping):
            self.error("defaults", f"must be a table, got {show(value)}")
            return None
        out: dict[str, float | int] = {}
        ok = True
        for key, item in value.items():
            field = f"defaults.{key}"
            if key not in DEFAULTS_FIELDS:
                self.warn(field, f"unknown default (ignored); known: {', '.join(DEFAULTS_FIELDS)}")
                continue
            if key == "temperature":
                good = _is_number(item) and 0 <= item <= 2
                what = "a number from 0 to 2"
            elif key == "top_p":
                good = _is_number(item) and 0 < item <= 1
                what = "a number greater than 0 and at most 1"
            elif key == "top_k":
                good = _is_int(item) and 0 <= item <= _INT64[1]
                what = "a non-negative integer (0 = no top-k cut)"
            else:
                good = _is_int(item) and 1 <= item <= _INT64[1]
                what = "an integer >= 1"
            if not good:
                self.error(field, f"must be {what}, got {show(item)}")
                ok = False
            else:
                out[key] = item
        return out if ok else None


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.75)
    return f"; did you mean {close[0]}?" if close else ""


def parse_entry(
    raw: object, *, file: str, index: int, base_dir: Path | None, roots: Sequence[Path] | None = None
) -> tuple[ModelEntry | None, tuple[Problem, ...]]:
    """Validate one raw table. Returns the entry (None when any error was found) and every problem.

    `index` is the entry's 1-based position, used to name it when it has no usable id. `base_dir` is the
    catalogue file's folder (None for entries from peers, whose local paths are already absolute).
    `roots`: confine a local source to these folders (entries from the network; see the module docstring).
    """
    if not isinstance(raw, Mapping):
        return None, (
            Problem(file=file, entry=index, field=None, message=f"must be a table, got {show(raw)}"),
        )
    parser = _EntryParser(raw, file=file, index=index, base_dir=base_dir, roots=roots)
    entry = parser.parse()
    return entry, tuple(parser.problems)


def validate_catalogue(
    data: object, *, file: str, base_dir: Path | None
) -> tuple[tuple[ModelEntry, ...], tuple[Problem, ...]]:
    """Validate a whole catalogue document: `{"models": [table, ...]}`.

    Bad entries are skipped and reported. A repeated id: the later entry is reported and skipped. An alias
    that is another entry's id, or that an earlier entry already claimed, is dropped with a warning (ids
    win over aliases, earlier entries over later ones), so every name resolves to exactly one entry.
    """
    problems: list[Problem] = []
    if not isinstance(data, Mapping):
        return (), (Problem(file=file, entry=None, field=None, message="must be a TOML document"),)
    for key in data:
        if key != "models":
            shown = key if isinstance(key, str) else repr(key)
            problems.append(
                Problem(
                    file=file,
                    entry=None,
                    field=shown,
                    message="unknown top-level key (ignored); entries go in [[models]] tables",
                    severity="warning",
                )
            )
    raw_models = data.get("models", [])
    if isinstance(raw_models, Mapping) or not isinstance(raw_models, list | tuple):
        problems.append(
            Problem(file=file, entry=None, field="models", message="must be an array of [[models]] tables")
        )
        return (), tuple(problems)

    parsed: list[tuple[int, ModelEntry]] = []
    first_index: dict[str, int] = {}
    for index, raw in enumerate(raw_models, start=1):
        entry, entry_problems = parse_entry(raw, file=file, index=index, base_dir=base_dir)
        problems.extend(entry_problems)
        if entry is None:
            continue
        if entry.id in first_index:
            problems.append(
                Problem(
                    file=file,
                    entry=entry.id,
                    field="id",
                    message=f"duplicate id (first defined in entry #{first_index[entry.id]}); skipped",
                )
            )
            continue
        first_index[entry.id] = index
        parsed.append((index, entry))

    claimed: dict[str, str] = {}  # alias → id of the entry that owns it
    entries: list[ModelEntry] = []
    for _index, entry in parsed:
        kept: list[str] = []
        for alias in entry.aliases:
            if alias in first_index:
                reason = f"alias {show(alias)} is the id of another entry; ignored"
            elif alias in claimed:
                reason = f"alias {show(alias)} already belongs to {show(claimed[alias])}; ignored"
            else:
                claimed[alias] = entry.id
                kept.append(alias)
                continue
            problems.append(
                Problem(file=file, entry=entry.id, field="aliases", message=reason, severity="warning")
            )
        entries.append(entry if len(kept) == len(entry.aliases) else replace(entry, aliases=tuple(kept)))
    return tuple(entries), tuple(problems)
