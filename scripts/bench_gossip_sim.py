"""Gossip simulation: N agents in one process over the in-memory transport (part of `scripts/bench mesh`).

Rounds are driven in lockstep on a simulated clock (one round = one gossip interval, 1 s), so the numbers
count protocol rounds, not this machine's speed. Each agent's record is realistic in size (two GPUs, two
models, three catalogue entries). Measured per fleet size and protocol mode:

- bootstrap: rounds until every agent knows every other, when each only knows agent 0 at start;
- spread: rounds until a change on a random agent is in every view (median and max of several trials);
  with unsynchronised timers a change made just after a round waits up to one more interval;
- bytes per agent per second (sent + received gossip message bodies), steady state with heartbeats only,
  and with churn (each agent changes its record with probability 0.1 per second), each over 120 rounds
  (a whole number of repair / full-exchange periods in both modes);
- failure detection: one agent stops answering (its links cut); rounds until every other agent has it
  `suspect`, and until every other has it `dead` (out of routing).

Modes: `old` is protocol 1 as first built (explicit digests, fanout 3, a full exchange every 120 rounds);
`new` is `DEFAULT_TIMING` (compact digests, see `mesh.gossip`), or its fanout overridden by `--fanout`.
HTTP request and response headers are not counted: ~0.3 KB per round trip in an open mesh, ~0.55 KB with
a mesh key (the signature headers), measured with aiohttp on loopback; an exchange is one round trip, two
after a change.

Usage: scripts/bench_gossip_sim.py [--sizes 10,50,100] [--modes old,new] [--trials 5] [--seed 1]
                                   [--fanout N]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helexa.engine.base import ModelId
from helexa.mesh.fleet.codec import dumps, node_to_dict
from helexa.mesh.fleet.records import DeviceRecord, ModelRecord, NodeId, NodeRecord
from helexa.mesh.gossip.exchange import Gossip
from helexa.mesh.gossip.transport import InMemoryNetwork, PeerAddr
from helexa.mesh.timing import DEFAULT_TIMING, MeshTiming

OLD_TIMING = dataclasses.replace(
    DEFAULT_TIMING, gossip_fanout=3, compact_digests=False, full_exchange_every_rounds=120
)
MEASURE_ROUNDS = 120


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


def _fleet(n: int, seed: int, timing: MeshTiming) -> tuple[SimClock, InMemoryNetwork, list[Gossip]]:
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
            timing=timing,
            clock=clock,
            rng=random.Random(rng.random()),
            seeds=[] if i == 0 else [PeerAddr("10.0.0.1", 31313)],
        )
        net.add(addr, g)
        gs.append(g)
    return clock, net, gs


async def _round(clock: SimClock, gs: list[Gossip]) -> None:
    clock.now += DEFAULT_TIMING.gossip_interval_s
    await asyncio.gather(*(g.round() for g in gs))


def _bytes(gs: list[Gossip]) -> int:
    return sum(g.stats.bytes_sent + g.stats.bytes_received for g in gs)


async def simulate(n: int, *, timing: MeshTiming, trials: int, seed: int) -> dict[str, float]:
    clock, net, gs = _fleet(n, seed, timing)
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

    # A whole number of repair / full-exchange periods, so those are counted at their real rate.
    before = _bytes(gs)
    for _ in range(MEASURE_ROUNDS):
        await _round(clock, gs)
    steady = (_bytes(gs) - before) / n / (MEASURE_ROUNDS * timing.gossip_interval_s)
    fallbacks_steady = sum(g.stats.digest_fallbacks for g in gs)

    before = _bytes(gs)
    for _ in range(MEASURE_ROUNDS):
        for g in gs:
            if rng.random() < 0.1:
                g.update_own(labels={"churn": str(rng.random())})
        await _round(clock, gs)
    churn = (_bytes(gs) - before) / n / (MEASURE_ROUNDS * timing.gossip_interval_s)
    alive_everywhere = all(g.liveness(h.self_id) == "alive" for g in gs for h in gs if g is not h)
    for _ in range(5):  # let the last changes land, then every view must hold every newest version
        await _round(clock, gs)
    converged = _settled(gs)

    # Failure detection: the victim's links are cut (a crash, as far as the others can tell).
    victim = rng.choice(gs)
    net.cut.add(PeerAddr(victim.own.address, victim.own.port))
    others = [g for g in gs if g is not victim]
    suspect_at = dead_at = 0
    for k in range(1, 40):
        await _round(clock, others)
        if not suspect_at and all(g.liveness(victim.self_id) in ("suspect", "dead") for g in others):
            suspect_at = k
        if all(g.liveness(victim.self_id) == "dead" for g in others):
            dead_at = k
            break
    return {
        "bootstrap_rounds": bootstrap,
        "spread_median_rounds": statistics.median(spreads),
        "spread_max_rounds": max(spreads),
        "steady_kb_s": steady / 1000,
        "churn_kb_s": churn / 1000,
        "failed": sum(g.stats.exchanges_failed for g in gs),
        "all_alive": float(alive_everywhere),
        "converged": float(converged),
        "fallbacks_steady": fallbacks_steady,
        "suspect_rounds": suspect_at,
        "dead_rounds": dead_at,
    }


def _settled(gs: list[Gossip]) -> bool:
    """Every view holds every node's newest (generation, version) (heartbeats may differ by a round)."""
    newest = {g.self_id: g.own.key for g in gs}
    return all(g.view[nid].key == key for g in gs for nid, key in newest.items())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,50,100")
    ap.add_argument("--modes", default="old,new", help="old (protocol 1 as first built) and/or new")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fanout", type=int, default=None, help="override the new mode's fanout")
    args = ap.parse_args(argv)
    # The failure-detection step cuts links on purpose: no warnings for that.
    logging.getLogger("helexa.mesh").setLevel(logging.ERROR)
    new_timing = DEFAULT_TIMING
    if args.fanout is not None:
        new_timing = dataclasses.replace(new_timing, gossip_fanout=args.fanout)
    modes = {"old": OLD_TIMING, "new": new_timing}
    chosen = [m.strip() for m in args.modes.split(",")]
    interval = DEFAULT_TIMING.gossip_interval_s
    print(f"gossip simulation: interval {interval:g} s, record ~{len(dumps(node_to_dict(_record(0))))} B")
    for m in chosen:
        t = modes[m]
        print(
            f"  {m}: {'compact' if t.compact_digests else 'explicit'} digests, fanout {t.gossip_fanout}, "
            f"{'repair check' if t.compact_digests else 'full exchange'} every "
            f"{t.full_exchange_every_rounds} rounds"
        )
    print(
        f"{'agents':>6} {'mode':>4} {'bootstrap s':>11} {'change everywhere s':>19} "
        f"{'KB/s steady':>11} {'KB/s churn':>10} {'suspect s':>9} {'dead s':>6} {'cpu s':>6}"
    )
    for n in (int(x) for x in args.sizes.split(",")):
        for m in chosen:
            t0 = time.process_time()
            r = asyncio.run(simulate(n, timing=modes[m], trials=args.trials, seed=args.seed))
            cpu = time.process_time() - t0
            spread = f"{r['spread_median_rounds'] * interval:g} / {r['spread_max_rounds'] * interval:g}"
            notes = "" if r["all_alive"] else "  (not all alive!)"
            notes += "" if r["converged"] else "  (views differ!)"
            print(
                f"{n:>6} {m:>4} {r['bootstrap_rounds'] * interval:>11g} {spread:>19} "
                f"{r['steady_kb_s']:>11.2f} {r['churn_kb_s']:>10.2f} "
                f"{r['suspect_rounds'] * interval:>9g} {r['dead_rounds'] * interval:>6g} {cpu:>6.1f}{notes}"
            )
    print(
        "(change everywhere: median / max; a change made between rounds waits up to one more interval.\n"
        " KB/s: gossip message bodies sent + received per agent. Not counted: HTTP headers, ~0.3 KB per\n"
        " round trip (~0.55 KB with a mesh key), i.e. + ~2 x fanout x 0.3-0.55 KB/s per agent on a network.\n"
        " suspect / dead: rounds until every other agent has a silent agent suspect / dead (out of routing).)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
