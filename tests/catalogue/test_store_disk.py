"""The catalogue file when the disk fails it (issue 12 items 8 and 11): a full disk is an error that names
the file and says what is wrong, never a bare traceback; a writer killed mid-write leaves a temp file that
is recognisably ours and removed at the next start.

A full disk is simulated by making the OS-level writes raise `ENOSPC` (the process test in
`tests/agent/test_agent_disk.py` fills a real tmpfs instead).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helexa.catalogue import store
from helexa.catalogue.store import CatalogueWriteError, add_entry, ensure_catalogue, load_catalogue
from tests.helpers.agentproc import REPO

ORIGINAL = '# the operator\'s comment\n[[models]]\nid = "org/m"\nsource = "org/m"\n'
NEW_ENTRY = {"id": "org/new", "source": "org/new"}


def _no_space(*_args: object, **_kw: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _temps(folder: Path) -> list[Path]:
    return sorted(folder.glob(".models.toml.*.tmp"))


def test_an_edit_on_a_full_disk_names_the_file_and_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "models.toml"
    path.write_text(ORIGINAL, encoding="utf-8")
    monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(CatalogueWriteError) as info:
        add_entry(path, NEW_ENTRY)
    assert str(info.value) == f"cannot write the catalogue {path}: no space left on device"
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    # Nothing changed, nothing left behind.
    assert path.read_text(encoding="utf-8") == ORIGINAL
    assert _temps(tmp_path) == []


def test_creating_the_default_catalogue_on_a_full_disk_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state" / "models.toml"
    monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(CatalogueWriteError, match="no space left on device") as info:
        ensure_catalogue(path)
    assert str(path) in str(info.value)
    assert not path.exists() and _temps(path.parent) == []


def test_temp_files_name_their_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A temp file carries the writer's pid, so a later start can tell a dead writer's leftover from a
    write in progress."""
    seen: list[str] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        seen.append(Path(src).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    add_entry(tmp_path / "models.toml", NEW_ENTRY)
    (name,) = seen
    assert name.startswith(f".models.toml.{os.getpid()}.") and name.endswith(".tmp")


_KILLED_WRITER = """
import os, signal, sys
from helexa.catalogue import store
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # killed mid-write: data written, not renamed
store.add_entry(sys.argv[1], {"id": "org/new", "source": "org/new"})
"""


def _kill_a_writer(path: Path) -> None:
    """A real process SIGKILLed in the middle of a catalogue write."""
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, str(path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()


def test_a_writer_killed_mid_write_leaves_a_temp_file_the_next_start_removes(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(ORIGINAL, encoding="utf-8")
    _kill_a_writer(path)
    (leftover,) = _temps(tmp_path)
    assert path.read_text(encoding="utf-8") == ORIGINAL  # the file itself is intact (atomic replace)
    # Fresh leftovers are spared a moment (a writer in another PID namespace may still be at it).
    load_catalogue(path)
    assert _temps(tmp_path) == [leftover]
    old = time.time() - store.STALE_TEMP_MIN_AGE_S - 1
    os.utime(leftover, (old, old))
    # The agent reads its catalogue at start: the dead writer's leftover goes.
    catalogue = load_catalogue(path)
    assert [e.id for e in catalogue.entries] == ["org/m"]
    assert _temps(tmp_path) == []


def test_a_live_writers_temp_file_and_other_files_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(ORIGINAL, encoding="utf-8")
    old = time.time() - store.STALE_TEMP_MIN_AGE_S - 1
    ours_in_progress = tmp_path / f".models.toml.{os.getpid()}.abcdef12.tmp"
    unrelated = [tmp_path / ".models.toml.swp", tmp_path / ".other.toml.1.abcdef12.tmp", tmp_path / "x.tmp"]
    for p in [ours_in_progress, *unrelated]:
        p.write_text("x")
        os.utime(p, (old, old))
    # A leftover of the old naming (no pid: tempfile's random suffix) is removed once old enough.
    legacy = tmp_path / ".models.toml.k3j_9x2a.tmp"
    legacy.write_text("x")
    os.utime(legacy, (old, old))
    load_catalogue(path)
    assert ours_in_progress.exists() and all(p.exists() for p in unrelated)
    assert not legacy.exists()
