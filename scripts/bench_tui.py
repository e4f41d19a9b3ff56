"""CPU share of `helexa tui` watching a simulated 50-node, 8-GPU-per-node fleet that changes twice a second.

Runs the real dashboard in a child process on a pseudo-terminal (so Textual renders and writes
escape codes exactly as it would for an operator), drains its output, and reads the child's CPU time
with psutil over the measured window. The simulation (the fake source) runs inside the same process,
so its cost is included: the number is an upper bound for the dashboard alone. Target: < 15 % of one core.

    scripts/bench tui [--seconds 30] [--nodes 50] [--gpus 8] [--size 200x50]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import select
import struct
import sys
import termios
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def drain(fd: int, until: float) -> int:
    total = 0
    while (left := until - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], min(left, 0.2))
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            total += len(chunk)
    return total


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--size", default="200x50")
    args = parser.parse_args()
    cols, rows = (int(v) for v in args.size.split("x"))

    code = f"from tui.app import main; raise SystemExit(main(['--fake-fleet', '{args.nodes}x{args.gpus}']))"
    pid, fd = pty.fork()
    if pid == 0:  # child: the dashboard
        os.chdir(ROOT)
        env = dict(
            os.environ, TERM="xterm-256color", COLUMNS=str(cols), LINES=str(rows), PYTHONPATH=str(ROOT)
        )
        os.execve(sys.executable, [sys.executable, "-c", code], env)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = psutil.Process(pid)
    try:
        drain(fd, time.monotonic() + args.warmup)
        cpu0 = proc.cpu_times()
        t0 = time.monotonic()
        written = drain(fd, t0 + args.seconds)
        cpu1 = proc.cpu_times()
        wall = time.monotonic() - t0
        rss_mb = proc.memory_info().rss / 2**20
    finally:
        os.write(fd, b"q")
        deadline = time.monotonic() + 5
        reaped = False
        while not reaped and time.monotonic() < deadline:
            drain(fd, time.monotonic() + 0.1)
            reaped = os.waitpid(pid, os.WNOHANG) != (0, 0)
        if not reaped:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    share = 100.0 * cpu / wall
    print(
        f"fleet: {args.nodes} nodes x {args.gpus} GPUs, every device changing every 0.5 s; "
        f"terminal {cols}x{rows}"
    )
    print(
        f"window: {wall:.1f} s after {args.warmup:.0f} s warm-up; "
        f"terminal output {written / wall / 1024:.1f} KiB/s"
    )
    print(f"CPU: {cpu:.2f} s = {share:.1f} % of one core (target < 15 %), RSS {rss_mb:.0f} MB")
    return 0 if share < 15.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
