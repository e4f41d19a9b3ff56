"""Node id stable across restarts; generation new and growing at every start."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
