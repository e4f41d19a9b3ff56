"""What the tests and the benchmarks (`scripts/bench_*.py`) share; test modules import from here, never
from each other.

- `polling`     `eventually()`: the one way to wait until something holds.
- `ports`       `free_port()`, `refused_port()`: loopback ports before anything listens.
- `agents`      real agents in the test process (`Fleet`, `Member`), the fake-engine `entry()`, shrunk
                timings (`FAST`, `TIMING`, `OPTIONS`) and the fixed-size `StaticHardware`.
- `agentproc`   real `helexa agent` processes (the command, a scrubbed environment, start, ready, stop)
                and readers of what they serve (`/mesh/state`, `/metrics`); imports nothing of helexa.
- `netns`       `NetnsLab`: network namespaces on one bridge, for the multi-host scenarios (root only).
- `strategies`  the Hypothesis strategies (catalogue entries, fleets for placement, wire records).
- `engine`      request builders and stream collectors for the engine tests.
- `fake_agent`  a tiny aiohttp stand-in for the agent's operator API (CLI and dashboard tests).
- `clock`       `FakeClock`, a clock that moves only when a test moves it.
"""
