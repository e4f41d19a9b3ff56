"""Gossip simulation: N agents in one process over the in-memory transport (part of `scripts/bench mesh`).

Rounds are driven in lockstep on a simulated clock (one round = one gossip interval, 1 s), so the numbers
count protocol rounds, not this machine's speed. Each agent's record is realistic in size (two GPUs, two
models, three catalogue entries). Measured per fleet size:

- bootstrap: rounds until every agent knows every other, when each only knows agent 0 at start;
- spread: rounds until a change on a random agent is in every view (median and max of several trials);
  with unsynchronised timers a change made just after a round waits up to one more interval;
- bytes per agent per second (sent + received, all gossip messages), steady state with heartbeats only,
  and with churn (each agent changes its record with probability 0.1 per second).

Usage: scripts/bench_gossip_sim.py [--sizes 10,50,100] [--trials 5] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.base import ModelId
from mesh.codec import dumps, node_to_dict
from mesh.gossip import Gossip, InMemoryNetwork, PeerAddr
from mesh.records import DeviceRecord, ModelRecord, NodeId, NodeRecord
from mesh.timing import DEFAULT_TIMING


class SimClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _record(i: int) -> NodeRecord:
    node_id = NodeId(f"{random.Random(i).getrandbits(128):032x}")  # like a uuid4 hex id
    return NodeRecord(
        node_id=node_id,
        name=f"host-{i:03d}",
        generation=1_764_221_000_000 + i,
        version=1,
        heartbeat=0,
        address=f"10.{i // 250}.{i % 250}.1",
        port=31313,
        agent_version="0.1.0",
        engines=("transformers", "mlc"),
        devices=tuple(
            DeviceRecord(
                name=f"cuda:{d}",
                kind="cuda",
                model="NVIDIA GeForce RTX 4090",
                uuid=f"GPU-{node_id[:8]}-{d}",
                memory_total_mb=24564,
                memory_free_mb=20000,
                utilization=0.1,
                temperature_c=50.0,
                compute_capability="8.9",
            )
            for d in range(2)
        ),
        models=(
            ModelRecord(
                id=ModelId("Qwen/Qwen2.5-7B-Instruct"),
                status="loaded",
                engine="mlc",
                devices=("cuda:0",),
                memory_mb=9000,
                last_used=1764221050.5,
                tokens_per_s=85.0,
            ),
            ModelRecord(
                id=ModelId("helexa/demo"),
                status="loaded",
                engine="transformers",
                devices=("cpu",),
                memory_mb=60,
                last_used=1764221050.5,
            ),
        ),
        catalogue=tuple(
            {
                "id": mid,
                "source": f"HF://mlc-ai/{mid.split('/')[-1]}-q4f16_1-MLC",
                "engine": "auto",
                "memory_mb": 9000,
                "min_devices": 1,
                "version": 1,
            }
            for mid in ("Qwen/Qwen2.5-7B-Instruct", "meta-llama/Llama-3.1-8B-Instruct", "helexa/demo")
        ),
    )


def _fleet(n: int, seed: int) -> tuple[SimClock, list[Gossip]]:
    clock = SimClock()
    net = InMemoryNetwork()
    rng = random.Random(seed)
    gs: list[Gossip] = []
    for i in range(n):
        own = _record(i)
        addr = PeerAddr(own.address, own.port)
        g = Gossip(
            own=own,
            transport=net.transport_for(addr),
            timing=DEFAULT_TIMING,
            clock=clock,
            rng=random.Random(rng.random()),
            seeds=[] if i == 0 else [PeerAddr("10.0.0.1", 31313)],
        )
        net.add(addr, g)
        gs.append(g)
    return clock, gs


async def _round(clock: SimClock, gs: list[Gossip]) -> None:
    clock.now += DEFAULT_TIMING.gossip_interval_s
    await asyncio.gather(*(g.round() for g in gs))


def _bytes(gs: list[Gossip]) -> int:
    return sum(g.stats.bytes_sent + g.stats.bytes_received for g in gs)


async def simulate(n: int, *, trials: int, seed: int) -> dict[str, float]:
    clock, gs = _fleet(n, seed)
    rng = random.Random(seed)
    bootstrap = 0
    while not all(len(g.view) == n for g in gs):
        await _round(clock, gs)
        bootstrap += 1
        if bootstrap > 200:
            raise RuntimeError("no convergence")
    for _ in range(10):  # settle (detector: everyone alive)
        await _round(clock, gs)

    spreads: list[int] = []
    for _ in range(trials):
        src = rng.choice(gs)
        new = src.update_own(labels={"trial": str(rng.random())})
        rounds = 0
        while not all(g.view[src.self_id].version >= new.version for g in gs):
            await _round(clock, gs)
            rounds += 1
        spreads.append(rounds)

    # One full-exchange period exactly, so full exchanges are counted at their real rate.
    measure_rounds = DEFAULT_TIMING.full_exchange_every_rounds
    before = _bytes(gs)
    for _ in range(measure_rounds):
        await _round(clock, gs)
    steady = (_bytes(gs) - before) / n / (measure_rounds * DEFAULT_TIMING.gossip_interval_s)

    before = _bytes(gs)
    for _ in range(measure_rounds):
        for g in gs:
            if rng.random() < 0.1:
                g.update_own(labels={"churn": str(rng.random())})
        await _round(clock, gs)
    churn = (_bytes(gs) - before) / n / (measure_rounds * DEFAULT_TIMING.gossip_interval_s)
    alive_everywhere = all(g.liveness(h.self_id) == "alive" for g in gs for h in gs if g is not h)
    return {
        "bootstrap_rounds": bootstrap,
        "spread_median_rounds": statistics.median(spreads),
        "spread_max_rounds": max(spreads),
        "steady_kb_s": steady / 1000,
        "churn_kb_s": churn / 1000,
        "failed": sum(g.stats.exchanges_failed for g in gs),
        "all_alive": float(alive_everywhere),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,50,100")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    interval = DEFAULT_TIMING.gossip_interval_s
    print(
        f"gossip simulation: interval {interval:g} s, fanout {DEFAULT_TIMING.gossip_fanout}, "
        f"full exchange every {DEFAULT_TIMING.full_exchange_every_rounds} rounds, record ~"
        f"{len(dumps(node_to_dict(_record(0))))} B"
    )
    print(
        f"{'agents':>6} {'bootstrap s':>11} {'change known everywhere s (median/max)':>40} "
        f"{'KB/s/agent steady':>18} {'KB/s/agent churn':>17} {'cpu s':>6}"
    )
    for n in (int(x) for x in args.sizes.split(",")):
        t0 = time.process_time()
        r = asyncio.run(simulate(n, trials=args.trials, seed=args.seed))
        cpu = time.process_time() - t0
        spread = f"{r['spread_median_rounds'] * interval:g} / {r['spread_max_rounds'] * interval:g}"
        print(
            f"{n:>6} {r['bootstrap_rounds'] * interval:>11g} {spread:>40} {r['steady_kb_s']:>18.1f} "
            f"{r['churn_kb_s']:>17.1f} {cpu:>6.1f}" + ("" if r["all_alive"] else "  (not all alive!)")
        )
    print("(bytes: sent + received per agent; a change made between rounds waits up to one more interval)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
