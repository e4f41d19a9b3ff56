"""Node id stable across restarts; generation new and growing at every start."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helexa.mesh.identity import load_identity, load_node_id


def test_node_id_stable_and_generation_grows(tmp_path: Path) -> None:
    first = load_identity(tmp_path)
    second = load_identity(tmp_path)
    assert first.node_id == second.node_id
    assert second.generation > first.generation
    assert (tmp_path / "node-id").read_text().strip() == first.node_id


def test_generation_grows_even_when_the_clock_steps_back(tmp_path: Path) -> None:
    a = load_identity(tmp_path, now_ms=5_000)
    b = load_identity(tmp_path, now_ms=1_000)
    c = load_identity(tmp_path, now_ms=1_000)
    assert a.generation == 5_000
    assert b.generation == 5_001
    assert c.generation == 5_002


def test_concurrent_first_starts_agree_on_one_id(tmp_path: Path) -> None:
    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(lambda _: load_node_id(tmp_path), range(16)))
    assert len(ids) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_malformed_node_id_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "node-id").write_text("not a valid id!\n")
    node_id = load_node_id(tmp_path)
    assert node_id != "not a valid id!"
    assert load_node_id(tmp_path) == node_id


def _no_space(*_args: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_state_dir_keeps_the_node_id_and_still_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 12 item 8: an agent whose state dir was full exited 1 at start (the generation could not be
    recorded). Now the id on disk is used and the warning names the file and the reason."""
    first = load_identity(tmp_path, now_ms=5_000)
    monkeypatch.setattr(os, "fsync", _no_space)
    second = load_identity(tmp_path, now_ms=1_000)
    assert second.node_id == first.node_id and second.persisted
    assert second.generation == 5_001  # still above every recorded one
    assert (tmp_path / "generation").read_text().strip() == "5000"  # not recorded
    assert f"cannot write {tmp_path / 'generation'}: no space left on device" in caplog.text
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_full_state_dir_without_a_node_id_runs_under_one_for_this_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(os, "fsync", _no_space)
    one = load_identity(tmp_path)
    two = load_identity(tmp_path)
    assert not one.persisted and len(one.node_id) == 32 and one.node_id != two.node_id
    assert not (tmp_path / "node-id").exists()
    assert f"cannot write {tmp_path / 'node-id'}: no space left on device" in caplog.text
    assert "for this run only" in caplog.text


def test_a_state_dir_that_cannot_be_created_is_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    ident = load_identity(tmp_path / "file" / "state")  # a folder under a plain file: ENOTDIR
    assert not ident.persisted and ident.generation > 0


def test_temp_files_of_a_killed_writer_are_removed_at_start(tmp_path: Path) -> None:
    load_identity(tmp_path)
    old = time.time() - 3600 * 2
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True
    )
    dead_pid = int(dead.stdout)
    leftovers = [
        tmp_path / f".node-id.{dead_pid}.0123abcd.tmp",
        tmp_path / f".generation.{dead_pid}.4567ef01.tmp",
    ]
    for p in leftovers:
        p.write_text("1\n")
        os.utime(p, (old, old))
    load_identity(tmp_path)
    assert not [p for p in leftovers if p.exists()]
