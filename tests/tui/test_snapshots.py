"""SVG snapshots of the main views, fed by the deterministic fake fleet (seeded, fixed clock, UTC).

Update after an intended change with `pytest tests/tui/test_snapshots.py --snapshot-update` and look at
the SVGs under `__snapshots__/` before committing them.
"""

from __future__ import annotations

from textual.pilot import Pilot

from helexa.tui.source import FakeFleetSource

from .conftest import make_app

SIZE = (150, 40)


def test_small_fleet(snap_compare) -> None:
    fake = FakeFleetSource(nodes=4, gpus_per_node=2)

    async def run_before(pilot: Pilot) -> None:
        await pilot.pause()
        fake.tick()
        await pilot.pause()

    assert snap_compare(make_app(fake), terminal_size=SIZE, run_before=run_before)


def test_large_fleet(snap_compare) -> None:
    fake = FakeFleetSource(nodes=50, gpus_per_node=8)

    async def run_before(pilot: Pilot) -> None:
        await pilot.pause()
        fake.tick()
        await pilot.pause()

    assert snap_compare(make_app(fake), terminal_size=SIZE, run_before=run_before)


def test_node_going_dead(snap_compare) -> None:
    fake = FakeFleetSource(nodes=4, gpus_per_node=2)

    async def run_before(pilot: Pilot) -> None:
        await pilot.pause()
        fake.kill_node("benjy", "suspect")
        fake.kill_node("benjy", "dead")
        await pilot.pause()

    assert snap_compare(make_app(fake), terminal_size=SIZE, run_before=run_before)


def test_model_loading_with_progress(snap_compare) -> None:
    fake = FakeFleetSource(nodes=4, gpus_per_node=2, load_steps=4)

    async def run_before(pilot: Pilot) -> None:
        await pilot.pause()
        await fake.load_model("meta-llama/Llama-3.1-8B-Instruct", "beast")
        fake.tick()
        fake.tick()
        await pilot.pause()

    assert snap_compare(make_app(fake), terminal_size=SIZE, run_before=run_before)


def test_open_mesh(snap_compare) -> None:
    fake = FakeFleetSource(nodes=2, gpus_per_node=1, open_mesh=True, mesh="homelab")

    async def run_before(pilot: Pilot) -> None:
        await pilot.pause()
        await pilot.press("2")
        await pilot.pause()

    assert snap_compare(make_app(fake), terminal_size=SIZE, run_before=run_before)
