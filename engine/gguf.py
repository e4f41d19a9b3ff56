"""GGUF sources: a `.gguf` file read through transformers' GGUF support, converted once and cached.

transformers reads a GGUF file by dequantizing every tensor into the torch dtype asked for, and converting
its embedded tokenizer; for SmolLM2-135M that takes 15-20 s here (more on a busy box), and a 7B file
minutes. So the first load converts and saves the result (safetensors in the load dtype, config,
tokenizer, chat template) under the agent's state directory, and every later load of the same file reads
that directory, like any local model, in a fraction of a second.

- The cache is keyed by the file's SHA-256 (a renamed or copied file still hits; a file replaced in place
  misses) and the dtype. Hashing a large file takes a while, so a digest is remembered per (path, size,
  mtime) in `digests.json`.
- An entry is written into a temporary folder and renamed into place, so a crash never leaves a
  half-written entry that a later load would trust.
- The cache is bounded (`gguf_cache_mb`): after a new entry is written the least recently used others are
  deleted until the total fits (the entry just written always stays: it is about to be loaded).
- `read_header` parses the file's header itself (no tensor data read): the architecture, the tensor
  types and the parameter count. It gives a clear error for a file that is not GGUF, for tensor types
  the `gguf` package cannot dequantize, and `memory_mb_estimate` for catalogue entries that leave
  `memory_mb` out.

Everything here blocks (file I/O, hashing, conversion): it runs in a loader thread, never on the loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

from .base import LoadProgress, ProgressCallback
from .errors import ModelSourceError, TransientLoadError

log = logging.getLogger(__name__)

GGUF_SUFFIX: Final = ".gguf"
# The cache bound when the agent's configuration gives none.
DEFAULT_CACHE_MB: Final = 20_480
# The file in each cache entry that says what it holds; its mtime is the entry's last use.
ENTRY_MARKER: Final = "helexa-gguf.json"
_DIGESTS: Final = "digests.json"
_DIGESTS_KEPT: Final = 256
# Hostile or corrupt headers: refuse counts and lengths no real file has, before allocating for them.
_MAX_TENSORS: Final = 1_000_000
_MAX_KVS: Final = 100_000
_MAX_STRING: Final = 64 * 2**20
_MAX_ARRAY: Final = 50_000_000
_MAX_DIMS: Final = 4
_HASH_CHUNK: Final = 8 * 2**20
# A `.converting-*` folder this old belongs to a conversion that died (a crash, a kill): removed.
_STALE_TMP_S: Final = 24 * 3600.0

# GGUF metadata value types (gguf spec): id -> struct format of a scalar.
_SCALARS: Final = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING: Final = 8
_ARRAY: Final = 9
# Tensor types stored as plain floats (no dequantization needed).
_PLAIN_TYPES: Final = frozenset({"F32", "F16", "BF16", "F64"})

# One conversion per file at a time in this process (two models, or two requests, naming one file).
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


@dataclass(frozen=True, kw_only=True, slots=True)
class GgufHeader:
    """What the header of a GGUF file says, without its tensor data."""

    version: int
    architecture: str
    name: str | None
    context_length: int | None
    parameters: int
    tensor_types: frozenset[str]


class _Reader:
    def __init__(self, f: BinaryIO, path: Path) -> None:
        self.f = f
        self.path = path

    def bad(self, why: str) -> ModelSourceError:
        return ModelSourceError(f"{self.path.name}: not a readable GGUF file ({why})")

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        data = self.f.read(size)
        if len(data) != size:
            raise self.bad("the header ends early")
        return struct.unpack(fmt, data)[0]

    def string(self) -> str:
        n = self.take("<Q")
        if n > _MAX_STRING:
            raise self.bad(f"a string of {n} bytes")
        data = self.f.read(n)
        if len(data) != n:
            raise self.bad("the header ends early")
        return data.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.take("<Q")
        if n > _MAX_STRING:
            raise self.bad(f"a string of {n} bytes")
        self.f.seek(n, os.SEEK_CUR)

    def value(self, kind: int, *, keep: bool) -> object:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            if keep:
                return self.string()
            self.skip_string()
            return None
        if kind == _ARRAY:
            item = self.take("<I")
            count = self.take("<Q")
            if count > _MAX_ARRAY or item == _ARRAY:
                raise self.bad(f"an array of {count} items of type {item}")
            if item in _SCALARS:
                self.f.seek(count * struct.calcsize(_SCALARS[item]), os.SEEK_CUR)
            elif item == _STRING:
                for _ in range(count):
                    self.skip_string()
            else:
                raise self.bad(f"an array of unknown type {item}")
            return None
        raise self.bad(f"unknown metadata type {kind}")


def _type_name(type_id: int) -> str:
    import gguf  # noqa: PLC0415 -- lazy: numpy and gguf only when a GGUF file is read

    try:
        return str(gguf.GGMLQuantizationType(type_id).name)
    except ValueError:
        return f"type {type_id}"


def _tensor_bytes(type_id: int, count: int) -> int:
    import gguf  # noqa: PLC0415 -- lazy, as above

    try:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        return 0  # an unknown type: `unsupported_types` names it
    return int(-(-count // block) * size)


def read_header(path: Path) -> GgufHeader:
    """Parse `path`'s GGUF header (metadata and tensor infos; the tensor data is never read).

    Raises `ModelSourceError` naming the file for anything that is not a GGUF v2/v3 header, and for a
    file shorter than its tensors need (a download or copy cut short)."""
    try:
        with path.open("rb") as f:
            r = _Reader(f, path)
            if f.read(4) != b"GGUF":
                raise r.bad("no GGUF magic")
            version = r.take("<I")
            if version not in (2, 3):
                raise r.bad(f"version {version}; versions 2 and 3 are supported")
            tensors, kvs = r.take("<Q"), r.take("<Q")
            if tensors > _MAX_TENSORS or kvs > _MAX_KVS:
                raise r.bad(f"{tensors} tensors, {kvs} metadata keys")
            meta: dict[str, object] = {}
            for _ in range(kvs):
                key = r.string()
                kind = r.take("<I")
                meta[key] = r.value(kind, keep=kind != _ARRAY)
            parameters = 0
            types: set[str] = set()
            data_end = 0
            for _ in range(tensors):
                r.skip_string()
                dims = r.take("<I")
                if dims > _MAX_DIMS:
                    raise r.bad(f"a tensor of {dims} dimensions")
                count = math.prod(r.take("<Q") for _ in range(dims))
                kind = r.take("<I")
                offset = r.take("<Q")
                parameters += count
                types.add(_type_name(kind))
                data_end = max(data_end, offset + _tensor_bytes(kind, count))
            alignment = meta.get("general.alignment")
            align = alignment if isinstance(alignment, int) and alignment > 0 else 32
            needed = -(-f.tell() // align) * align + data_end
            size = os.fstat(f.fileno()).st_size
            if size < needed:
                raise r.bad(f"cut short: {size} bytes, its tensors end at byte {needed}")
    except OSError as exc:
        raise ModelSourceError(f"cannot read {path}: {exc.strerror or exc}") from exc
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelSourceError(f"{path.name}: the GGUF header names no general.architecture")
    context = meta.get(f"{arch}.context_length")
    name = meta.get("general.name")
    return GgufHeader(
        version=version,
        architecture=arch,
        name=name if isinstance(name, str) else None,
        context_length=context if isinstance(context, int) and context > 0 else None,
        parameters=parameters,
        tensor_types=frozenset(types),
    )


def memory_mb_estimate(header: GgufHeader, bytes_per_parameter: int = 4) -> int:
    """Memory the dequantized model needs, in MB: its weights in float32 (what the CPU loads; a GPU
    load in half precision needs less) plus a tenth for activations and the allocator. Placement
    replaces it with the measured value once a copy has been loaded somewhere."""
    return math.ceil(header.parameters * bytes_per_parameter * 1.1 / 2**20)


def unsupported_types(header: GgufHeader) -> list[str]:
    """The tensor types in `header` the `gguf` package cannot dequantize, sorted."""
    import gguf  # noqa: PLC0415 -- lazy, as above

    return sorted(
        t for t in header.tensor_types if t not in _PLAIN_TYPES and getattr(gguf.quants, t, None) is None
    )


def is_gguf_source(source: str) -> bool:
    """Whether a catalogue source names a GGUF file (`/path/x.gguf` or `org/name:x.gguf`)."""
    return source.lower().endswith(GGUF_SUFFIX)


def split_hub_gguf(source: str) -> tuple[str, str] | None:
    """`org/name:path/file.gguf` -> (repo id, file name in the repo); None for anything else."""
    repo, sep, filename = source.partition(":")
    if not sep or repo.count("/") != 1 or not filename or not is_gguf_source(filename):
        return None
    if repo.startswith(("/", ".", "~")) or filename.startswith("/") or ".." in filename.split("/"):
        return None
    return repo, filename


# -- the conversion cache ----------------------------------------------------------------------------


def file_digest(path: Path, cache_dir: Path) -> str:
    """The SHA-256 of `path`, remembered per (real path, size, mtime) in `cache_dir/digests.json`."""
    st = path.stat()
    key = os.path.realpath(path)
    stamp = [st.st_size, st.st_mtime_ns]
    memo_file = cache_dir / _DIGESTS
    memo: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(memo_file.read_text())
        if isinstance(loaded, dict):
            memo = loaded
    known = memo.get(key)
    if isinstance(known, dict) and known.get("stamp") == stamp and isinstance(known.get("sha256"), str):
        return str(known["sha256"])
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    memo.pop(key, None)
    memo[key] = {"stamp": stamp, "sha256": digest}
    while len(memo) > _DIGESTS_KEPT:
        memo.pop(next(iter(memo)))
    with contextlib.suppress(OSError):
        _write_atomic(memo_file, json.dumps(memo))
    return digest


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _entries(cache_dir: Path) -> list[Path]:
    return [p for p in cache_dir.iterdir() if p.is_dir() and (p / ENTRY_MARKER).is_file()]


def evict(cache_dir: Path, limit_mb: int, *, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used entries (marker mtime) until the cache holds at most `limit_mb`.
    `keep` (the entry being loaded) is never deleted: with a limit smaller than one entry, the cache holds
    just the last one used. Leftovers of conversions that died (`.converting-*` older than a day) go too.
    Returns the entries deleted."""
    now = time.time()
    for stale in cache_dir.glob(".converting-*"):
        with contextlib.suppress(OSError):
            if now - stale.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(stale, ignore_errors=True)
    entries = sorted(_entries(cache_dir), key=lambda p: (p / ENTRY_MARKER).stat().st_mtime)
    sizes = {p: _tree_bytes(p) for p in entries}
    total = sum(sizes.values())
    deleted: list[Path] = []
    for entry in entries:
        if total <= limit_mb * 2**20:
            break
        if entry == keep:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        total -= sizes[entry]
        deleted.append(entry)
    return deleted


def _lock_for(key: str) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(key, threading.Lock())


Converter = Callable[[Path, Path, str], None]


def cached_model_dir(
    gguf_file: Path,
    *,
    cache_dir: Path,
    dtype: str,
    limit_mb: int,
    report: ProgressCallback,
    convert: Converter | None = None,
) -> Path:
    """A transformers model directory holding `gguf_file` dequantized to `dtype`: the cached one, or a
    new one converted now (`convert(gguf_file, out_dir, dtype)`, transformers' by default)."""
    header = read_header(gguf_file)
    bad = unsupported_types(header)
    if bad:
        raise ModelSourceError(
            f"{gguf_file.name}: tensor type(s) {', '.join(bad)} cannot be dequantized by the gguf package"
        )
    try:
        return _cached_or_converted(
            gguf_file,
            header,
            cache_dir=cache_dir,
            dtype=dtype,
            limit_mb=limit_mb,
            report=report,
            convert=convert,
        )
    except OSError as exc:  # a full disk, a read-only state directory: the operator can mend it
        raise TransientLoadError(
            f"{gguf_file.name}: cannot write its converted copy in {cache_dir}: {exc.strerror or exc}"
        ) from exc


def _cached_or_converted(
    gguf_file: Path,
    header: GgufHeader,
    *,
    cache_dir: Path,
    dtype: str,
    limit_mb: int,
    report: ProgressCallback,
    convert: Converter | None,
) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    digest = file_digest(gguf_file, cache_dir)
    entry = cache_dir / f"{digest[:32]}-{dtype}"
    with _lock_for(str(entry)):
        if (entry / ENTRY_MARKER).is_file():
            os.utime(entry / ENTRY_MARKER)
            log.info("%s: converted copy found in %s", gguf_file.name, entry)
            return entry
        report(LoadProgress(phase="converting", fraction=None))
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".converting-"))
        try:
            (convert or convert_with_transformers)(gguf_file, tmp, dtype)
            marker = {
                "file": gguf_file.name,
                "sha256": digest,
                "dtype": dtype,
                "architecture": header.architecture,
            }
            (tmp / ENTRY_MARKER).write_text(json.dumps(marker))
            try:
                os.rename(tmp, entry)
            except OSError:  # another process converted the same file meanwhile: use theirs
                if not (entry / ENTRY_MARKER).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info(
            "%s: converted to %s in %.1f s (%s)", gguf_file.name, dtype, time.monotonic() - started, entry
        )
        for gone in evict(cache_dir, limit_mb, keep=entry):
            log.info("GGUF cache over %d MB: removed %s", limit_mb, gone.name)
        return entry


def convert_with_transformers(gguf_file: Path, out_dir: Path, dtype: str) -> None:
    """Dequantize `gguf_file` with transformers and save it as a plain model directory in `out_dir`."""
    import torch  # noqa: PLC0415 -- lazy: an idle agent must not import torch
    import transformers  # noqa: PLC0415 -- lazy, like torch

    tf: Any = transformers
    tf.utils.logging.disable_progress_bar()
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype))
    except (
        ValueError,
        KeyError,
        TypeError,
        IndexError,
    ) as exc:  # an architecture it cannot map, a bad tensor
        raise ModelSourceError(f"{name}: transformers cannot load it: {exc}") from exc
    except NotImplementedError as exc:  # a quant type the gguf package cannot dequantize
        raise ModelSourceError(f"{name}: {exc}") from exc
    # transformers refuses to save a model it "quantized with gguf"; the weights are plain tensors by
    # now, so drop the marker and save them as any model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
