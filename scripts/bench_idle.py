"""`scripts/bench idle`: an idle agent's start-to-ready time and resident memory.

Starts a real `helexa agent` process (fresh state directory, the default catalogue, port 0) several
times; for each run measures the time from spawning the process until `GET /healthz` answers 200, then,
after a short settle, the process's RSS. Targets (MISSION): ready < 2 s, RSS < 150 MB.

    scripts/bench idle [--runs N] [--settle-s S]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers.agentproc import agent_command, agent_env  # noqa: E402
from tests.helpers.polling import eventually  # noqa: E402

READY_TARGET_S = 2.0
RSS_TARGET_MB = 150.0
LISTENING = re.compile(rb"listening on (http://[\d.]+:\d+)")


async def one_run(settle_s: float) -> tuple[float, float]:
    """(seconds from spawn to a 200 from /healthz, idle RSS in MB) of one fresh agent process."""
    with tempfile.TemporaryDirectory(prefix="helexa-bench-idle-") as tmp:
        env = agent_env(Path(tmp), {"HELEXA_STATE_DIR": str(Path(tmp) / "state")})
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *agent_command(),
            "agent",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stderr is not None
        try:
            url = None
            while url is None:
                line = await proc.stderr.readline()
                if not line:
                    raise RuntimeError("the agent exited before listening")
                if m := LISTENING.search(line):
                    url = m.group(1).decode()
            async with aiohttp.ClientSession() as http:

                async def healthy() -> bool:
                    async with http.get(f"{url}/healthz") as r:
                        return r.status == 200

                await eventually(
                    healthy,
                    timeout_s=60,
                    interval_s=0.005,
                    retry_on=(aiohttp.ClientError,),
                    what="/healthz to answer 200",
                )
            ready_s = time.perf_counter() - started
            # Keep draining stderr so the agent never blocks on a full pipe.
            drain = asyncio.create_task(proc.stderr.read())
            await asyncio.sleep(settle_s)
            rss_mb = psutil.Process(proc.pid).memory_info().rss / (1024 * 1024)
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 15)
            await drain
            return ready_s, rss_mb
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def main_async(runs: int, settle_s: float) -> int:
    ready: list[float] = []
    rss: list[float] = []
    for i in range(runs):
        r, m = await one_run(settle_s)
        ready.append(r)
        rss.append(m)
        print(f"run {i + 1}: ready {r:.3f} s, idle RSS {m:.1f} MB", flush=True)
    ready_med, rss_med = statistics.median(ready), statistics.median(rss)
    ok_ready = max(ready) < READY_TARGET_S
    ok_rss = max(rss) < RSS_TARGET_MB
    print()
    print(f"{'':24}{'median':>10}{'max':>10}{'target':>10}")
    verdict = {True: "ok", False: "MISSED"}
    print(f"{'start to ready (s)':24}{ready_med:>10.3f}{max(ready):>10.3f}{'< 2':>10}  {verdict[ok_ready]}")
    print(f"{'idle RSS (MB)':24}{rss_med:>10.1f}{max(rss):>10.1f}{'< 150':>10}  {verdict[ok_rss]}")
    return 0 if ok_ready and ok_rss else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench idle", description=__doc__.splitlines()[0] if __doc__ else ""
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--settle-s", type=float, default=1.0, help="idle time before reading RSS")
    args = parser.parse_args()
    return asyncio.run(main_async(args.runs, args.settle_s))


if __name__ == "__main__":
    raise SystemExit(main())
