"""`scripts/bench oversize`: what one 15 MB prompt costs an agent (issue 12, item 1).

A real `helexa agent` process (`--no-mdns`, loopback, a catalogue with the demo model, loaded before
measuring) is sent a 15 MB prompt (under the 16 MiB body cap) several times, and each time the bench
prints the time from sending the request to reading the whole 400 answer, and the agent's peak RSS
growth over its RSS just before (a thread of this process samples the agent's RSS with psutil every
`--sample-ms`, 2 ms by default, while the request runs), and what is still held a moment after.

Three requests take turns each round (A, B, C, the order rotating), so machine noise hits all alike:

  A  chat      `POST /v1/chat/completions`, the 15 MB text as one user message (the engine refuses a text
               longer than `context_length * max_token_chars` before tokenizing)
  B  completion `POST /v1/completions` with the same text as `prompt`
  C  edge      the same 15 MB chat body for a model the catalogue does not have: the HTTP edge alone
               (read the body, parse it, route) answers 404, so C is what the edge spends of A

Targets (issue 12): A and B answered (400, `context_length_exceeded`) in < 1 s, with < 100 MB of peak RSS
growth.

    scripts/bench oversize [--rounds N] [--mb 15] [--sample-ms 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers.agentproc import agent_argv, start_agent, stop_agent, wait_ready  # noqa: E402
from tests.helpers.ports import free_port  # noqa: E402

MODEL = "helexa/demo"
TIME_TARGET_S = 1.0
RSS_TARGET_MB = 100.0
WORDS = "the quick brown fox jumps over the lazy dog and then it runs far away into the woods "


class RssSampler:
    """Samples one process's RSS every `every_s` in a thread; `peak()` is the largest seen since `reset()`."""

    def __init__(self, pid: int, every_s: float) -> None:
        self._proc = psutil.Process(pid)
        self._every_s = every_s
        self._peak = 0
        self._samples = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self._proc.memory_info().rss
            with self._lock:
                self._peak = max(self._peak, rss)
                self._samples += 1
            time.sleep(self._every_s)

    def now(self) -> int:
        return int(self._proc.memory_info().rss)

    def reset(self) -> None:
        with self._lock:
            self._peak = self.now()
            self._samples = 0

    def peak(self) -> tuple[int, int]:
        with self._lock:
            return self._peak, self._samples


@dataclass(frozen=True, kw_only=True, slots=True)
class Shot:
    status: int
    code: str
    seconds: float
    peak_growth_mb: float
    held_after_mb: float  # RSS 0.5 s after the answer, over the RSS before
    samples: int


async def shot(http: aiohttp.ClientSession, url: str, path: str, body: bytes, sampler: RssSampler) -> Shot:
    await asyncio.sleep(0.3)  # let the agent settle (and the previous request's memory go)
    before = statistics.median([sampler.now() for _ in range(5)])
    sampler.reset()
    start = time.perf_counter()
    async with http.post(f"{url}{path}", data=body, headers={"Content-Type": "application/json"}) as r:
        payload = await r.read()
        status = r.status
    seconds = time.perf_counter() - start
    peak, samples = sampler.peak()
    await asyncio.sleep(0.5)
    after = sampler.now()
    try:
        code = str(orjson.loads(payload)["error"].get("code"))
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        code = payload[:80].decode(errors="replace")
    return Shot(
        status=status,
        code=code,
        seconds=seconds,
        peak_growth_mb=(peak - before) / 2**20,
        held_after_mb=(after - before) / 2**20,
        samples=samples,
    )


async def main_async(rounds: int, mb: float, sample_ms: float) -> int:
    text = (WORDS * (int(mb * 1_000_000) // len(WORDS) + 1))[: int(mb * 1_000_000)]
    bodies = {
        "A chat": ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": text}]}),
        "B completion": ("/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 16}),
        "C edge (404)": (
            "/v1/chat/completions",
            {"model": "bench/no-such-model", "messages": [{"role": "user", "content": text}]},
        ),
    }
    encoded = {name: (path, orjson.dumps(b)) for name, (path, b) in bodies.items()}
    sizes = {name: len(b) for name, (_, b) in encoded.items()}
    with tempfile.TemporaryDirectory(prefix="helexa-bench-oversize-") as tmp:
        work = Path(tmp)
        catalogue = work / "models.toml"
        catalogue.write_text(
            f'[[models]]\nid = "{MODEL}"\nengine = "transformers"\nsource = "builtin:demo"\n'
            "memory_mb = 200\ncontext_length = 512\nkeep_alive = -1\n"
        )
        port = free_port()
        argv = agent_argv(
            name="oversize",
            port=port,
            host="127.0.0.1",
            state_dir=work / "agent",
            catalogue=catalogue,
            mdns=False,
            extra=("--log-level", "warning"),
        )
        agent = start_agent(
            name="oversize", url=f"http://127.0.0.1:{port}", state_dir=work / "agent", argv=argv
        )
        results: dict[str, list[Shot]] = {name: [] for name in encoded}
        try:
            timeout = aiohttp.ClientTimeout(total=300)
            async with aiohttp.ClientSession(timeout=timeout) as http:
                await wait_ready(http, [agent], timeout_s=60)
                async with http.post(f"{agent.url}/mesh/models/load", json={"model": MODEL}) as r:
                    if r.status != 200:
                        raise RuntimeError(f"load failed: {r.status} {await r.text()}\n{agent.log_tail()}")
                # One small request first: the first-request costs are not what we measure.
                small = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
                async with http.post(f"{agent.url}/v1/chat/completions", json=small) as r:
                    assert r.status == 200, await r.text()
                rss0 = psutil.Process(agent.pid).memory_info().rss / 2**20
                print(
                    f"agent pid {agent.pid}, demo model loaded, RSS {rss0:.0f} MB; bodies "
                    + ", ".join(f"{n.split()[0]} {s / 1e6:.1f} MB" for n, s in sizes.items())
                    + f"; {rounds} rounds, RSS sampled every {sample_ms:g} ms",
                    flush=True,
                )
                names = list(encoded)
                with RssSampler(agent.pid, sample_ms / 1000) as sampler:
                    for i in range(rounds):
                        order = names[i % len(names) :] + names[: i % len(names)]
                        for name in order:
                            path, body = encoded[name]
                            s = await shot(http, agent.url, path, body, sampler)
                            results[name].append(s)
                            print(
                                f"  round {i + 1} {name:14} {s.status} {s.code:26} {s.seconds * 1000:8.1f} ms"
                                f"  peak +{s.peak_growth_mb:6.1f} MB  held {s.held_after_mb:+7.1f} MB"
                                f"  ({s.samples} samples)",
                                flush=True,
                            )
                rss1 = psutil.Process(agent.pid).memory_info().rss / 2**20
        finally:
            await asyncio.to_thread(stop_agent, agent)
    print()
    print(f"{'':16}{'status':>8}{'median ms':>11}{'max ms':>9}{'peak +MB max':>14}{'held +MB max':>14}")
    for name, shots in results.items():
        statuses = "/".join(sorted({str(s.status) for s in shots}))
        print(
            f"{name:16}{statuses:>8}{statistics.median(s.seconds for s in shots) * 1000:>11.1f}"
            f"{max(s.seconds for s in shots) * 1000:>9.1f}{max(s.peak_growth_mb for s in shots):>14.1f}"
            f"{max(s.held_after_mb for s in shots):>14.1f}"
        )
    print(f"agent RSS {rss0:.0f} MB before the first, {rss1:.0f} MB after the last")
    ok = True
    for name in ("A chat", "B completion"):
        shots = results[name]
        refused = all(s.status == 400 and s.code == "context_length_exceeded" for s in shots)
        worst_s = max(s.seconds for s in shots)
        worst_mb = max(s.peak_growth_mb for s in shots)
        good = refused and worst_s < TIME_TARGET_S and worst_mb < RSS_TARGET_MB
        ok &= good
        print(
            f"{name}: 400 context_length_exceeded {'every time' if refused else 'NOT every time'}; "
            f"time to the 400 max {worst_s:.3f} s (target < {TIME_TARGET_S:g} s), peak RSS growth max "
            f"{worst_mb:.1f} MB (target < {RSS_TARGET_MB:g} MB) {'ok' if good else 'MISSED'}"
        )
    edge = statistics.median(s.seconds for s in results["C edge (404)"])
    chat = statistics.median(s.seconds for s in results["A chat"])
    print(f"the HTTP edge alone (C, median) is {edge / chat:.0%} of the chat refusal's time (A, median)")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench oversize", description=__doc__.splitlines()[0] if __doc__ else ""
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mb", type=float, default=15.0, help="prompt size in MB (10^6 characters)")
    parser.add_argument("--sample-ms", type=float, default=2.0, help="RSS sampling interval")
    args = parser.parse_args()
    return asyncio.run(main_async(args.rounds, args.mb, args.sample_ms))


if __name__ == "__main__":
    raise SystemExit(main())
