"""Fetching Hugging Face hub repos and files into the HF cache: progress, resume, a disk check, offline.

Blocking functions for a loader thread (the engine calls them through `in_own_thread`), never for the
event loop. A fetch (`fetch_snapshot`, `fetch_file`) goes:

1. **Ask.** `model_info` names the commit the revision points at and the repo's files; a HEAD per file
   not yet linked in the cache gives its size and ETag (the name of its blob in the cache). When the hub
   cannot be asked (no network, `HF_HUB_OFFLINE`, a 5xx, or a refusal), the cache answers instead if it
   holds that revision complete; otherwise the hub's failure becomes the error.
2. **Disk.** The bytes still to fetch are checked against the free space on the cache's disk before
   anything is written.
3. **Transfer.** A missing file streams into `blobs/<etag>.incomplete` from where that file ends (a
   `Range` request). A connection that breaks mid-file is resumed at once while bytes keep coming, and
   the partial file outlives a failed attempt: the caller's retry of `TransientLoadError`, or an agent
   restarted mid-download, picks up where it stopped. Files stored in Xet are left to `hf_hub_download`
   (hf_xet keeps its own chunk cache).
4. **Link.** `snapshot_download` / `hf_hub_download`, pinned to the commit, find every blob present and
   only write the snapshot's links and the cached tree listing (with which an offline host checks that
   its snapshot is complete); then `refs/<revision>` is pointed at the commit.

Why not `snapshot_download` for the transfer too: in huggingface_hub 2.x it hands progress over in
10 MB chunks (nothing at all during a smaller file), resumes a broken connection only from the last
whole chunk, and deletes the partial file when an attempt fails.

Progress is `LoadProgress(phase="downloading")` with the bytes done (what the cache already holds,
partial files included) of the total and the rate over the last few seconds: at the start, at most
every `REPORT_INTERVAL_S` while bytes come, and at the end. Single flight: concurrent fetches of the
same files (repo, revision, cache, endpoint) in this process share one download; every caller's
callback sees its progress and every caller gets its path or its error; a later call starts afresh.

The hub is `HF_ENDPOINT` (read at each call, so a mirror can be set without a restart) and the token
is huggingface_hub's own (`HF_TOKEN`, or the one `hf auth login` saved). huggingface_hub is imported
inside the functions: it takes ~80 ms to import and only a download needs it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import LoadProgress, ProgressCallback
from .errors import LoadError, ModelSourceError, TransientLoadError

log = logging.getLogger(__name__)

# How often progress is reported while bytes come in: often enough that a bar visibly moves, seldom
# enough that a fast LAN download does not flood the event loop with callbacks.
REPORT_INTERVAL_S = 0.25
# The rate is measured over this much recent time: long enough to smooth a bursty connection, short
# enough that a stall shows within seconds.
RATE_WINDOW_S = 5.0
# A broken connection is retried from where the file ends, at once while bytes keep coming; this many
# tries in a row that bring nothing end the fetch with `TransientLoadError` (the caller retries later,
# and resumes from the partial file).
MAX_FRUITLESS_TRIES = 5
# The wait before retrying a broken connection, doubled per fruitless try (huggingface_hub waits 1 s).
RETRY_WAIT_S = 1.0

_MB = 1_000_000
# A rate measured over less time than this is noise (the start's report comes right after the plan).
_MIN_RATE_SPAN_S = 0.05


def fetch_snapshot(
    repo_id: str,
    *,
    revision: str | None,
    cache_dir: Path | None,
    allow_patterns: Sequence[str],
    report: ProgressCallback,
    endpoint: str | None = None,
) -> Path:
    """The snapshot folder of `repo_id` at `revision` (None: `main`) in the HF cache (`cache_dir`, None:
    the default), holding the repo's files that match `allow_patterns`, downloaded where missing.

    Raises `ModelSourceError` when the hub says no (no such repo, revision or files; gated or private
    without a token; not enough disk) and `TransientLoadError` when it cannot be reached or the transfer
    fails (retrying resumes it)."""
    target = _Target.of(repo_id, revision, cache_dir, endpoint)
    patterns = tuple(allow_patterns)
    return _single_flight(
        target.key(("snapshot", *patterns)), report, lambda r: _snapshot(target, patterns, r)
    )


def fetch_file(
    repo_id: str,
    filename: str,
    *,
    revision: str | None,
    cache_dir: Path | None,
    report: ProgressCallback,
    endpoint: str | None = None,
) -> Path:
    """The path in the HF cache of one file of `repo_id` at `revision` (e.g. a `.gguf`), downloaded if
    missing; as `fetch_snapshot` otherwise (progress, resume, disk check, offline, single flight)."""
    target = _Target.of(repo_id, revision, cache_dir, endpoint)
    return _single_flight(target.key(("file", filename)), report, lambda r: _file(target, filename, r))


def free_bytes(folder: Path) -> int:
    """Free bytes on the disk that holds `folder` (or its nearest existing parent)."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path(os.sep))
    return shutil.disk_usage(existing).free


# -- what is fetched -------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class _Target:
    """A repo at a revision, in a cache, from a hub."""

    repo_id: str
    revision: str
    cache_dir: Path
    endpoint: str

    @staticmethod
    def of(repo_id: str, revision: str | None, cache_dir: Path | None, endpoint: str | None) -> _Target:
        from huggingface_hub import constants  # noqa: PLC0415 -- lazy, see the module docstring

        return _Target(
            repo_id=repo_id,
            revision=revision or constants.DEFAULT_REVISION,
            cache_dir=Path(cache_dir or constants.HF_HUB_CACHE).expanduser().resolve(),
            endpoint=(endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/"),
        )

    @property
    def storage(self) -> Path:
        """The repo's folder in the cache (`models--org--name`)."""
        return self.cache_dir / ("models--" + self.repo_id.replace("/", "--"))

    def key(self, what: tuple[str, ...]) -> tuple[str, ...]:
        return (self.endpoint, str(self.cache_dir), self.repo_id, self.revision, *what)

    def __str__(self) -> str:
        return self.repo_id if self.revision == "main" else f"{self.repo_id}@{self.revision}"


@dataclass(frozen=True, kw_only=True, slots=True)
class _File:
    """One file of the commit: its size (0 when the hub does not say), its blob's name (None: already
    linked in the snapshot), whether the cache holds it whole (linked, or its blob is there), the bytes
    of it the cache holds (its partial file's when not whole), and whether `hf_hub_download` fetches it
    (stored in Xet, or of unknown size)."""

    name: str
    size: int
    etag: str | None
    cached: bool
    have: int
    via_hf: bool
    size_known: bool = True


class _HubUnanswered(Exception):
    """The hub could not be asked, or would not answer: the cache may still hold what is wanted."""

    def __init__(self, problem: Exception) -> None:
        super().__init__(str(problem))
        self.problem = problem


# -- the two fetches -------------------------------------------------------------------------------------


def _snapshot(target: _Target, patterns: tuple[str, ...], report: ProgressCallback) -> Path:
    from huggingface_hub import snapshot_download  # noqa: PLC0415 -- lazy, see the module docstring

    # The utils facade is public, but typed without re-exports.
    from huggingface_hub.utils import filter_repo_objects  # type: ignore[attr-defined]  # noqa: PLC0415

    def cached() -> str:
        return snapshot_download(
            target.repo_id,
            revision=target.revision,
            cache_dir=target.cache_dir,
            allow_patterns=list(patterns),
            local_files_only=True,
        )

    try:
        commit, names = _ask(target)
    except _HubUnanswered as exc:
        return _from_cache(target, exc.problem, cached, report)
    wanted = list(filter_repo_objects(names, allow_patterns=list(patterns)))
    if not wanted:
        raise ModelSourceError(f"{target} has no files matching {', '.join(patterns)}")
    _transfer(target, commit, wanted, report)
    with _translated(target):
        path = snapshot_download(
            target.repo_id,
            revision=commit,
            cache_dir=target.cache_dir,
            allow_patterns=list(patterns),
            endpoint=target.endpoint,
            tqdm_class=_QuietBar,  # duck-typed tqdm
        )
    _point_ref(target, commit)
    return Path(path)


def _file(target: _Target, filename: str, report: ProgressCallback) -> Path:
    from huggingface_hub import hf_hub_download  # noqa: PLC0415 -- lazy, see the module docstring

    def cached() -> str:
        return hf_hub_download(
            target.repo_id,
            filename,
            revision=target.revision,
            cache_dir=target.cache_dir,
            local_files_only=True,
        )

    try:
        commit, names = _ask(target)
    except _HubUnanswered as exc:
        return _from_cache(target, exc.problem, cached, report)
    if filename not in names:
        raise ModelSourceError(f"{target} has no file {filename}")
    _transfer(target, commit, [filename], report)
    with _translated(target, filename):
        path = hf_hub_download(
            target.repo_id,
            filename,
            revision=commit,
            cache_dir=target.cache_dir,
            endpoint=target.endpoint,
            tqdm_class=_QuietBar,  # duck-typed tqdm
        )
    _point_ref(target, commit)
    return Path(path)


def _ask(target: _Target) -> tuple[str, list[str]]:
    """The commit `target.revision` names and the files in it. Raises `_HubUnanswered` when the hub
    could not be asked or refused (the cache may answer instead); a revision the hub does not know, or a
    malformed repo id, is final."""
    import httpx2  # noqa: PLC0415 -- lazy, see the module docstring
    from huggingface_hub import HfApi, constants  # noqa: PLC0415
    from huggingface_hub.errors import HFValidationError, RevisionNotFoundError  # noqa: PLC0415

    try:
        info = HfApi(endpoint=target.endpoint).model_info(
            target.repo_id, revision=target.revision, timeout=constants.HF_HUB_ETAG_TIMEOUT
        )
    except (RevisionNotFoundError, HFValidationError) as exc:
        raise _translate(exc, target) from exc
    except (httpx2.HTTPError, OSError, ValueError) as exc:
        # OSError covers the hub's HTTP errors and HF_HUB_OFFLINE; ValueError a reply that is not JSON.
        raise _HubUnanswered(exc) from exc
    if not info.sha:
        raise TransientLoadError(f"the hub at {target.endpoint} named no commit for {target}")
    return info.sha, [s.rfilename for s in info.siblings or ()]


def _from_cache(
    target: _Target, problem: Exception, cached: Callable[[], str], report: ProgressCallback
) -> Path:
    """What the cache holds of `target` (complete, as far as the cache can tell), or the hub's problem."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled  # noqa: PLC0415 -- lazy

    try:
        path = Path(cached())
    except LocalEntryNotFoundError:
        error = _translate(problem, target)
        raise type(error)(
            f"{error}; and {target} is not complete in the cache {target.cache_dir}"
        ) from problem
    # Offline by choice (HF_HUB_OFFLINE) is no news; a hub that cannot be reached is.
    level = logging.INFO if isinstance(problem, OfflineModeIsEnabled) else logging.WARNING
    log.log(level, "cannot ask the hub about %s (%s): loading the copy in %s", target, problem, path)
    report(LoadProgress(phase="downloading", fraction=1.0))
    return path


# -- the transfer ----------------------------------------------------------------------------------------


def _transfer(target: _Target, commit: str, names: list[str], report: ProgressCallback) -> None:
    """Bring every blob of `names` at `commit` into the cache, after checking the disk can hold them."""
    files: list[_File] = []
    for name in names:
        with _translated(target, name):
            files.append(_inspect(target, commit, name))
    missing = [f for f in files if not f.cached]
    need = sum(f.size - f.have for f in missing)
    if need:
        free = free_bytes(target.cache_dir)
        if need > free:
            raise ModelSourceError(
                f"not enough disk space to download {target}: it needs {need / _MB:,.1f} MB and "
                f"{target.cache_dir} has {free / _MB:,.1f} MB free"
            )
    meter = _Meter(files, report=report)
    meter.report(force=True)
    if not missing:
        return
    log.info(
        "downloading %s (%s): %d of %d files, %.1f MB, into %s",
        target,
        commit[:12],
        len(missing),
        len(files),
        need / _MB,
        target.cache_dir,
    )
    began = time.monotonic()
    for f in missing:
        with _translated(target, f.name):
            blob = (
                _fetch_via_hf(target, commit, f, meter) if f.via_hf else _fetch_blob(target, commit, f, meter)
            )
        meter.finish(f.name, blob.stat().st_size)
    meter.report(force=True)
    log.info("downloaded %s in %.1f s", target, time.monotonic() - began)


def _inspect(target: _Target, commit: str, name: str) -> _File:
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url  # noqa: PLC0415 -- lazy

    linked = target.storage / "snapshots" / commit / name
    if linked.exists():
        size = linked.stat().st_size
        return _File(name=name, size=size, etag=None, cached=True, have=size, via_hf=False)
    meta = get_hf_file_metadata(
        hf_hub_url(target.repo_id, name, revision=commit, endpoint=target.endpoint),
        timeout=constants.HF_HUB_ETAG_TIMEOUT,
        endpoint=target.endpoint,
    )
    if meta.etag is None:
        raise ModelSourceError(f"the hub at {target.endpoint} gave no ETag for {name} of {target}")
    # hf_hub_download fetches a file stored in Xet (falling back to HTTP itself without hf_xet), and one
    # whose size the hub does not say (no resume without knowing where the file ends).
    via_hf = meta.xet_file_data is not None or meta.size is None
    size = meta.size or 0
    blob = target.storage / "blobs" / meta.etag
    partial = _partial(blob)
    if blob.exists():
        size = blob.stat().st_size
        return _File(name=name, size=size, etag=meta.etag, cached=True, have=size, via_hf=via_hf)
    have = min(size, partial.stat().st_size) if partial.exists() and not via_hf else 0
    return _File(
        name=name,
        size=size,
        etag=meta.etag,
        cached=False,
        have=have,
        via_hf=via_hf,
        size_known=meta.size is not None,
    )


def _partial(blob: Path) -> Path:
    return blob.with_name(blob.name + ".incomplete")


def _fetch_blob(target: _Target, commit: str, f: _File, meter: _Meter) -> Path:
    """Stream one file into its blob (returned), resuming its partial file; under huggingface_hub's lock
    for that blob, so another process (or `hf_hub_download`) never writes it at the same time."""
    from huggingface_hub import hf_hub_url  # noqa: PLC0415 -- lazy
    from huggingface_hub.utils import WeakFileLock, build_hf_headers  # type: ignore[attr-defined]  # noqa: PLC0415

    assert f.etag is not None
    blob = target.storage / "blobs" / f.etag
    lock = target.cache_dir / ".locks" / target.storage.name / f"{f.etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    blob.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):
        if blob.exists():  # another fetch brought it meanwhile
            return blob
        partial = _partial(blob)
        url = hf_hub_url(target.repo_id, f.name, revision=commit, endpoint=target.endpoint)
        # Identity: a compressed body's byte offsets are not the file's, so a Range could not resume it.
        headers = build_hf_headers() | {"Accept-Encoding": "identity"}
        _stream(url, partial, size=f.size, headers=headers, on_progress=lambda n: meter.set(f.name, n))
        os.replace(partial, blob)
    return blob


def _stream(
    url: str, partial: Path, *, size: int, headers: dict[str, str], on_progress: Callable[[int], None]
) -> None:
    """GET `url` into `partial`, from where `partial` ends (a Range request); a broken connection is
    resumed from where it broke. `on_progress(n)` is told the bytes in `partial` after every chunk."""
    import httpx2  # noqa: PLC0415 -- lazy
    from huggingface_hub import constants, get_session, hf_raise_for_status  # noqa: PLC0415

    fruitless = 0
    while True:
        have = partial.stat().st_size if partial.exists() else 0
        if have > size:  # not a prefix of this blob: start over
            partial.unlink()
            have = 0
        on_progress(have)
        if partial.exists() and have == size:
            return
        request_headers = headers | ({"Range": f"bytes={have}-"} if have else {})
        got = 0
        try:
            with get_session().stream(
                "GET", url, headers=request_headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT
            ) as response:
                if response.status_code >= 400:
                    response.read()  # the error's body names the problem
                hf_raise_for_status(response)
                if have and response.status_code != 206:  # the whole file came back: write it anew
                    have = 0
                    on_progress(have)
                with partial.open("ab") as out:
                    out.truncate(have)
                    for chunk in response.iter_bytes():
                        out.write(chunk)
                        got += len(chunk)
                        on_progress(have + got)
        except httpx2.TransportError as exc:
            fruitless = 0 if got else fruitless + 1
            if fruitless >= MAX_FRUITLESS_TRIES:
                raise
            log.warning("download of %s broke at byte %d (%s): resuming", url, have + got, exc)
            time.sleep(RETRY_WAIT_S * 2 ** max(0, fruitless - 1))
            continue
        written = partial.stat().st_size
        if written != size:
            partial.unlink()
            raise TransientLoadError(f"{url} gave {written} bytes where the hub announced {size}")
        return


def _fetch_via_hf(target: _Target, commit: str, f: _File, meter: _Meter) -> Path:
    """`hf_hub_download` fetches (and links) the file; its bar class counts the bytes into `meter`."""
    from huggingface_hub import hf_hub_download  # noqa: PLC0415 -- lazy

    return Path(
        hf_hub_download(
            target.repo_id,
            f.name,
            revision=commit,
            cache_dir=target.cache_dir,
            endpoint=target.endpoint,
            tqdm_class=_meter_bar(meter, f.name),  # duck-typed tqdm
        )
    )


def _point_ref(target: _Target, commit: str) -> None:
    """`refs/<revision>` names `commit` (what an offline host resolves the revision with), written
    atomically and only once the snapshot is complete."""
    if target.revision == commit:
        return
    ref = target.storage / "refs" / target.revision
    if ref.is_file() and ref.read_text() == commit:
        return
    ref.parent.mkdir(parents=True, exist_ok=True)
    scratch = ref.with_name(f".{ref.name}.{os.getpid()}.{threading.get_ident()}")
    scratch.write_text(commit)
    os.replace(scratch, ref)


# -- errors ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _translated(target: _Target, filename: str | None = None) -> Iterator[None]:
    """huggingface_hub's and httpx's exceptions become `LoadError`s at this boundary."""
    import httpx2  # noqa: PLC0415 -- lazy

    try:
        yield
    except LoadError:
        raise
    except (httpx2.HTTPError, OSError, ValueError) as exc:
        raise _translate(exc, target, filename) from exc


def _translate(exc: Exception, target: _Target, filename: str | None = None) -> LoadError:
    """The `LoadError` for a failure of the hub or the transfer: structural (`ModelSourceError`) when
    asking again cannot help, else transient."""
    from huggingface_hub.errors import (  # noqa: PLC0415 -- lazy
        DisabledRepoError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hub = target.endpoint
    token = "give this host a token that may read it (HF_TOKEN, or `hf auth login`)"
    if isinstance(exc, LoadError):
        return exc
    if isinstance(exc, GatedRepoError):
        return ModelSourceError(f"{target.repo_id} is gated on {hub}: accept its terms there, then {token}")
    if isinstance(exc, RepositoryNotFoundError):
        return ModelSourceError(f"{target.repo_id} is not on {hub} (if it is private, {token})")
    if isinstance(exc, RevisionNotFoundError):
        return ModelSourceError(f"{target.repo_id} has no revision {target.revision!r} on {hub}")
    if isinstance(exc, RemoteEntryNotFoundError):
        return ModelSourceError(f"{target} has no file {filename or '?'} on {hub}")
    if isinstance(exc, DisabledRepoError):
        return ModelSourceError(f"{target.repo_id} is disabled on {hub}")
    if isinstance(exc, HFValidationError):
        return ModelSourceError(f"{target.repo_id!r} is not a repo id: {exc}")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code
        if status in (401, 403):
            return ModelSourceError(
                f"{hub} refused access to {target.repo_id} ({status}): gated or private; {token}"
            )
        if status == 404:
            return ModelSourceError(f"{hub} has no {target} ({filename or 'repo'}: 404)")
        return TransientLoadError(f"{hub} failed while {target} was downloading ({status})")
    if isinstance(exc, OfflineModeIsEnabled):
        return TransientLoadError(f"HF_HUB_OFFLINE is set: {target} cannot be downloaded")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return ModelSourceError(f"the disk of {target.cache_dir} filled up while {target} was downloading")
    return TransientLoadError(f"downloading {target} from {hub} failed: {exc}")


# -- progress --------------------------------------------------------------------------------------------


class _Meter:
    """Bytes done of one fetch per file, the recent rate, and throttled reports. Thread-safe: hf_xet
    reports from threads of its own."""

    def __init__(
        self, files: Sequence[_File], *, report: ProgressCallback, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._size = {f.name: f.size for f in files}
        # Files whose size the hub did not say: until they are known, so is not the total.
        self._unknown = {f.name for f in files if not f.size_known}
        self._done = {f.name: f.have for f in files}
        self._total = sum(self._size.values())
        self._sum = sum(self._done.values())
        self._report = report
        self._clock = clock
        self._lock = threading.Lock()
        # (time, bytes done) at each report: the rate is measured across the window they span.
        self._samples: deque[tuple[float, int]] = deque([(clock(), self._sum)])
        self._reported_at = -math.inf

    def add(self, name: str, n: int) -> None:
        with self._lock:
            self._done[name] += n
            self._sum += n
            self._emit(force=False)

    def set(self, name: str, done: int) -> None:
        with self._lock:
            self._sum += done - self._done[name]
            self._done[name] = done
            self._emit(force=False)

    def resize(self, name: str, size: int) -> None:
        """`name` turns out to have `size` bytes (the hub's HEAD did not say)."""
        with self._lock:
            self._resize(name, size)

    def finish(self, name: str, size: int) -> None:
        """`name` is in the cache, whole: `size` bytes."""
        with self._lock:
            self._resize(name, size)
            self._sum += size - self._done[name]
            self._done[name] = size
            self._emit(force=False)

    def _resize(self, name: str, size: int) -> None:
        self._total += size - self._size[name]
        self._size[name] = size
        self._unknown.discard(name)

    def report(self, *, force: bool) -> None:
        with self._lock:
            self._emit(force=force)

    def _emit(self, *, force: bool) -> None:
        now = self._clock()
        if not force and now - self._reported_at < REPORT_INTERVAL_S:
            return
        self._reported_at = now
        self._samples.append((now, self._sum))
        while len(self._samples) > 2 and self._samples[1][0] <= now - RATE_WINDOW_S:
            self._samples.popleft()
        since, then = self._samples[0]
        rate = max(0, self._sum - then) / (now - since) if now - since >= _MIN_RATE_SPAN_S else None
        total = None if self._unknown else self._total
        done = self._sum if total is None else min(self._sum, total)
        fraction = None if total is None else done / total if total else 1.0
        # Called under the lock, so reports from several threads arrive in order.
        self._report(
            LoadProgress(
                phase="downloading", fraction=fraction, done_bytes=done, total_bytes=total, bytes_per_s=rate
            )
        )


class _QuietBar:
    """Stands in for tqdm where huggingface_hub wants a progress bar class: draws nothing. It has
    `update_transfer`, so huggingface_hub hands it both the bytes written (`update`) and the bytes
    received (`update_transfer`, ignored) instead of opening a second bar."""

    def __init__(self, *args: object, **kwargs: Any) -> None:
        self.total: float | None = kwargs.get("total")
        self.n: float = kwargs.get("initial") or 0
        self.format_dict: dict[str, Any] = {}

    def update(self, n: float | None = 1) -> None:
        self.n += n or 0

    def update_transfer(self, n: float | None = 1) -> None:
        pass

    def set_postfix_str(self, *args: object, **kwargs: object) -> None:
        pass

    set_transfer_postfix_str = set_description = set_description_str = set_postfix_str

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _QuietBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _meter_bar(meter: _Meter, name: str) -> type[_QuietBar]:
    """A bar class that counts the bytes huggingface_hub writes for `name` into `meter`."""

    class _Bar(_QuietBar):
        def __init__(self, *args: object, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if self.total:
                meter.resize(name, int(self.total))
            meter.set(name, int(self.n))

        def update(self, n: float | None = 1) -> None:
            super().update(n)
            meter.add(name, int(n or 0))

    return _Bar


# -- single flight ---------------------------------------------------------------------------------------


@dataclass(eq=False, kw_only=True)
class _Flight:
    """One download under way, and everyone waiting for it."""

    listeners: list[ProgressCallback] = field(default_factory=list)
    last: LoadProgress | None = None
    finished: threading.Event = field(default_factory=threading.Event)
    path: Path | None = None
    error: BaseException | None = None

    def report(self, progress: LoadProgress) -> None:
        with _FLIGHTS_LOCK:
            self.last = progress
            listeners = list(self.listeners)
        for listener in listeners:
            try:
                listener(progress)
            except Exception:  # one caller's broken callback must not fail the others' download
                log.debug("a download progress callback failed", exc_info=True)


_FLIGHTS: dict[tuple[str, ...], _Flight] = {}
_FLIGHTS_LOCK = threading.Lock()


def _single_flight(
    key: tuple[str, ...], report: ProgressCallback, fetch: Callable[[ProgressCallback], Path]
) -> Path:
    """`fetch(report)`, unless a fetch of `key` is under way in this process: then wait for that one,
    seeing its progress, and share its outcome."""
    with _FLIGHTS_LOCK:
        flight = _FLIGHTS.get(key)
        leading = flight is None
        if flight is None:
            flight = _FLIGHTS[key] = _Flight()
        flight.listeners.append(report)
        if not leading and flight.last is not None:
            report(flight.last)  # under the lock: nothing newer can overtake it
    if not leading:
        log.info("waiting for the download of %s already under way", key[2])
        flight.finished.wait()
        if flight.error is not None:
            raise _for_waiter(flight.error) from flight.error
        assert flight.path is not None
        return flight.path
    try:
        flight.path = fetch(flight.report)
        return flight.path
    except BaseException as exc:
        flight.error = exc
        raise
    finally:
        with _FLIGHTS_LOCK:
            del _FLIGHTS[key]
        flight.finished.set()


def _for_waiter(error: BaseException) -> BaseException:
    """The error a waiting caller raises: a fresh one (one exception object raised in several threads
    would collect all their tracebacks)."""
    if isinstance(error, LoadError):
        return type(error)(str(error))
    return TransientLoadError(f"the download this load waited for failed: {error!r}")
