"""Real `helexa agent` processes, as an operator runs them, for the scenarios (`tests/scenarios/netns`,
`tests/scenarios/shutdown`), the process tests of `tests/agent` and the benchmarks (`scripts/bench_mesh.py`,
`scripts/bench_idle.py`). Agents in the test process are started by `tests.helpers.agents` instead.

Only the public surface is used: the command line (`helexa agent --name ... --peer ...`), `/healthz`,
`GET /mesh/state` (shape in `mesh.fleet.records`), `/metrics` and the OpenAI routes. Nothing here imports the
agent, so these checks hold for an installed package too: `HELEXA_TEST_AGENT_CMD` (a shell-quoted command
prefix, default `<this python> -m helexa.mesh.cli`) runs another `helexa` binary.

Each agent gets a scrubbed environment (no `HELEXA_*` from the caller, `HOME` inside its state folder) and
its stderr (the agent logs there) goes to `<state dir>.log`, so a failure message can show the log tail
without a pipe that fills up and stalls the agent.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.polling import eventually

REPO = Path(__file__).resolve().parents[2]


def agent_command() -> list[str]:
    """The command that runs `helexa` (without the `agent` subcommand)."""
    custom = os.environ.get("HELEXA_TEST_AGENT_CMD")
    return shlex.split(custom) if custom else [sys.executable, "-m", "helexa.mesh.cli"]


def agent_argv(
    *,
    name: str,
    port: int,
    state_dir: Path,
    catalogue: Path,
    host: str = "0.0.0.0",
    peers: Sequence[str] = (),
    mdns: bool = True,
    extra: Sequence[str] = (),
) -> list[str]:
    """`helexa agent ...` with the flags of /work/notes/config.md."""
    argv = [
        *agent_command(),
        "agent",
        "--name",
        name,
        "--host",
        host,
        "--port",
        str(port),
        "--state-dir",
        str(state_dir),
        "--catalogue",
        str(catalogue),
    ]
    for peer in peers:
        argv += ["--peer", peer]
    if not mdns:
        argv.append("--no-mdns")
    return [*argv, *extra]


def agent_env(home: Path, extra: Mapping[str, str] | None = None, *, no_color: bool = True) -> dict[str, str]:
    """The caller's environment without `HELEXA_*` (a developer's settings must not leak in), `HOME` at
    `home`, then `extra`. `no_color=False` leaves `NO_COLOR` unset, even if the caller had it (for tests
    of the agent's own colour choice)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELEXA_") and k != "NO_COLOR"}
    env |= {"HOME": str(home), "PYTHONUNBUFFERED": "1"}
    if no_color:
        env["NO_COLOR"] = "1"
    # The agents run from the repository (an editable install works from anywhere, a plain checkout not).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env | dict(extra or {})


@dataclass(kw_only=True)
class AgentProc:
    """One agent process: where it listens, its log, and the process (possibly inside a namespace)."""

    name: str
    url: str  # http://address:port as clients reach it
    state_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def start_agent(
    *,
    name: str,
    url: str,
    state_dir: Path,
    argv: Sequence[str],
    popen: Any = subprocess.Popen,
    env: Mapping[str, str] | None = None,
) -> AgentProc:
    """Start `argv` with stderr and stdout going to `<state_dir>.log`. `popen` lets a netns lab wrap it
    (`functools.partial(lab.popen, i)`)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir.with_suffix(".log")
    with log_path.open("wb") as log:
        proc = popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else agent_env(state_dir),
            cwd=str(REPO),
        )
    return AgentProc(name=name, url=url, state_dir=state_dir, log_path=log_path, proc=proc)


async def wait_ready(http: aiohttp.ClientSession, agents: Iterable[AgentProc], *, timeout_s: float) -> None:
    """Until every agent answers `/healthz` with 200; fails with the log of one that died or never did."""
    pending = list(agents)

    async def ready() -> tuple[bool, str]:
        for agent in list(pending):
            if agent.proc is not None and agent.proc.poll() is not None:
                raise AssertionError(
                    f"agent {agent.name} exited with {agent.proc.returncode} before it was ready:\n"
                    f"{agent.log_tail()}"
                )
            try:
                async with http.get(f"{agent.url}/healthz", timeout=aiohttp.ClientTimeout(total=1)) as r:
                    if r.status == 200:
                        pending.remove(agent)
            except (aiohttp.ClientError, TimeoutError):
                pass
        return not pending, pending[0].log_tail() if pending else ""

    await eventually(
        ready,
        timeout_s=timeout_s,
        interval_s=0.1,
        what=f"agents {', '.join(a.name for a in pending)} ready (/healthz 200)",
    )


def stop_agent(agent: AgentProc, *, timeout_s: float = 10.0) -> int | None:
    """SIGTERM, then SIGKILL if it does not exit in time; returns the exit status."""
    if agent.proc is None or agent.proc.poll() is not None:
        return None if agent.proc is None else agent.proc.returncode
    agent.proc.terminate()
    try:
        return agent.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        agent.proc.kill()
        return agent.proc.wait(timeout=5)


# --- reading an agent's view ------------------------------------------------------------------------------

_SHORT = aiohttp.ClientTimeout(total=2)


async def get_state(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """`GET /mesh/state` as JSON; raises AssertionError with the body on a non-200 answer."""
    async with http.get(f"{url}/mesh/state", timeout=_SHORT) as r:
        if r.status != 200:
            raise AssertionError(f"GET {url}/mesh/state: {r.status} {await r.text()}")
        body: dict[str, Any] = await r.json()
        return body


def liveness(state: Mapping[str, Any]) -> dict[str, str]:
    """Node name → liveness as the answering agent sees it (itself included)."""
    return {str(n["name"]): str(n.get("liveness")) for n in state.get("nodes", [])}


def own_node(state: Mapping[str, Any]) -> dict[str, Any]:
    """The answering agent's own node record."""
    for node in state.get("nodes", []):
        if node.get("id") == state.get("self"):
            return dict(node)
    raise AssertionError(f"/mesh/state lists no node with the id of 'self' ({state.get('self')!r})")


def model_status(node: Mapping[str, Any], model: str) -> str | None:
    """The status of `model` on `node` ("loaded", "loading", ...), or None when absent."""
    for m in node.get("models", []):
        if m.get("id") == model:
            return str(m.get("status"))
    return None


def nodes_with(state: Mapping[str, Any], model: str, statuses: Iterable[str] = ("loaded",)) -> set[str]:
    """Names of the nodes that have `model` in one of `statuses`, in the answering agent's view."""
    want = set(statuses)
    return {str(n["name"]) for n in state.get("nodes", []) if model_status(n, model) in want}


def node_keys(state: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Node name → (generation, version): equal across agents once their views converged."""
    return {str(n["name"]): (int(n["generation"]), int(n["version"])) for n in state.get("nodes", [])}


async def metric_samples(http: aiohttp.ClientSession, url: str, sample_name: str) -> list[Any]:
    """Every sample named `sample_name` (e.g. `helexa_model_loads_total`) of the agent's `/metrics`."""
    async with http.get(f"{url}/metrics", timeout=_SHORT) as r:
        assert r.status == 200, await r.text()
        text = await r.text()
    return [
        s for family in text_string_to_metric_families(text) for s in family.samples if s.name == sample_name
    ]


async def loads_started(http: aiohttp.ClientSession, url: str, model: str) -> int:
    """Loads of `model` this agent ran (ok or error), from `helexa_model_loads_total`."""
    samples = await metric_samples(http, url, "helexa_model_loads_total")
    return int(sum(s.value for s in samples if s.labels.get("model") == model))


_LISTENING = re.compile(r"listening on http://[^\s:]+:(\d+)")


async def wait_listening(agent: AgentProc, *, host: str = "127.0.0.1", timeout_s: float = 30.0) -> str:
    """For an agent started with `--port 0`: the URL from its "listening on ..." log line (also sets
    `agent.url`)."""

    def listening() -> tuple[bool, str]:
        if m := _LISTENING.search(agent.log_text()):
            agent.url = f"http://{host}:{m.group(1)}"
            return True, ""
        if agent.proc is not None and agent.proc.poll() is not None:
            raise AssertionError(
                f"agent {agent.name} exited with {agent.proc.returncode}:\n{agent.log_tail()}"
            )
        return False, agent.log_tail()

    await eventually(listening, timeout_s=timeout_s, what=f"agent {agent.name} listening")
    return agent.url
