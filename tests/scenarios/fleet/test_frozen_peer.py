"""A frozen peer (issue 12, item 7): SIGSTOP leaves its socket accepting connections and taking bytes, but
nothing answers. Requests sent to it before the failure detector declares it dead (~8 s) used to wait
out the whole freeze (a non-streamed one up to 900 s) and were never retried. Now a peer that starts no
response within seconds is given up on and the request served elsewhere.

The quick test freezes a stand-in: a socket that listens and never accepts (exactly what a stopped
process looks like from outside), announced by gossip with the model loaded. The slow one stops a real
agent process with SIGSTOP.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from helexa.mesh.timing import PEER_RESPONSE_START_TIMEOUT_S
from tests.helpers.agentproc import (
    agent_argv,
    get_state,
    liveness,
    nodes_with,
    start_agent,
    stop_agent,
    wait_ready,
)
from tests.helpers.agents import Fleet, entry
from tests.helpers.forge import loaded, push, record
from tests.helpers.polling import eventually
from tests.helpers.ports import free_port

# Time to serve the request once the frozen peer is given up on (a local fake load and answer).
SLACK_S = 3.0


@contextlib.contextmanager
def frozen_listener() -> Iterator[int]:
    """A port whose socket listens but never accepts: connections complete (the kernel's backlog) and
    take the request, and no byte ever comes back, as from a SIGSTOPped agent."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield int(s.getsockname()[1])


async def _ask(http: aiohttp.ClientSession, url: str, *, stream: bool) -> tuple[int, str, float]:
    request = {"model": "org/m", "messages": [{"role": "user", "content": "x"}], "stream": stream}
    started = time.monotonic()
    async with http.post(
        f"{url}/v1/chat/completions", json=request, timeout=aiohttp.ClientTimeout(total=30)
    ) as resp:
        text = await resp.text()
    return resp.status, text, time.monotonic() - started


async def test_a_request_to_a_frozen_peer_is_served_elsewhere_within_seconds(fleet: Fleet) -> None:
    a = await fleet.start("a", entries=[entry("org/m", options={"tokens": ["from a"]})])
    with frozen_listener() as port:
        stop = asyncio.Event()

        async def announce() -> None:  # the frozen node's last gossip, still spreading (the ~8 s window)
            beat = 0
            while not stop.is_set():
                rec = record("frozen-node", port=port, heartbeat=beat, models=[loaded("org/m")])
                await push(fleet.http, a.url, [rec], sender="frozen-node")
                beat += 1
                await asyncio.sleep(0.05)

        announcing = asyncio.create_task(announce())
        try:
            await eventually(lambda: a.agent.mesh.gossip.liveness("frozen-node") == "alive", what="the node")
            for stream in (False, True):
                status, text, took_s = await _ask(fleet.http, a.url, stream=stream)
                assert status == 200, text
                assert "from a" in text and took_s < PEER_RESPONSE_START_TIMEOUT_S + SLACK_S
        finally:
            stop.set()
            await announcing


async def test_a_slow_answer_is_not_a_frozen_peer(fleet: Fleet) -> None:
    """A non-streamed forward whose answer takes many keep-alive intervals (a cold load, a slow
    generation) gets it, with its real status, failure included (the serving agent sends spaces while it
    works, then the answer: `mesh.routing.peer_client`)."""
    entries = [
        entry("org/slow", options={"tokens": ["t"] * 5, "token_delay_s": 0.1, "load_delay_s": 0.3}),
        entry("org/broken", options={"tokens": ["x"], "fail_load": "no weights", "load_delay_s": 0.3}),
    ]
    b = await fleet.start("b", entries=entries)
    a = await fleet.start("a", entries=entries, memory_mb=10, peers=[b])  # too small: b serves
    await eventually(lambda: a.sees(b) and b.sees(a), what="membership")
    async with fleet.http.post(f"{a.url}/v1/completions", json={"model": "org/slow", "prompt": "x"}) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["choices"][0]["text"] == "ttttt"
    async with fleet.http.post(
        f"{a.url}/v1/completions", json={"model": "org/broken", "prompt": "x"}
    ) as resp:
        body = await resp.json()
    assert resp.status == 503 and body["error"]["code"] == "model_load_failed", body
    assert b.loads("org/slow") == 1 and a.loads("org/slow") == 0


MODELS_TOML = """\
[[models]]
id = "org/m"
engine = "fake"
memory_mb = 100
options = {tokens = ["ok"], memory_mb = 100}
"""


@pytest.mark.slow
async def test_a_sigstopped_agent_is_given_up_on_and_the_request_served_elsewhere(tmp_path: Path) -> None:
    ports = {"a": free_port(), "b": free_port()}
    agents = {}
    for name, other in (("a", "b"), ("b", "a")):
        catalogue = tmp_path / f"{name}-models.toml"
        catalogue.write_text(MODELS_TOML)
        argv = agent_argv(
            name=name,
            port=ports[name],
            state_dir=tmp_path / name,
            catalogue=catalogue,
            host="127.0.0.1",
            peers=[f"127.0.0.1:{ports[other]}"],
            mdns=False,
        )
        agents[name] = start_agent(
            name=name, url=f"http://127.0.0.1:{ports[name]}", state_dir=tmp_path / name, argv=argv
        )
    a, b = agents["a"], agents["b"]
    try:
        async with aiohttp.ClientSession() as http:
            await wait_ready(http, [a, b], timeout_s=30)

            async def a_sees_b() -> bool:
                return liveness(await get_state(http, a.url)).get("b") == "alive"

            await eventually(a_sees_b, timeout_s=15, what="a to see b", retry_on=(aiohttp.ClientError,))
            async with http.post(f"{a.url}/mesh/models/load", json={"model": "org/m", "node": "b"}) as resp:
                assert resp.status == 200, await resp.text()

            async def a_sees_it_on_b() -> bool:
                return nodes_with(await get_state(http, a.url), "org/m") == {"b"}

            await eventually(a_sees_it_on_b, what="the model loaded on b, in a's view")
            os.kill(b.pid, signal.SIGSTOP)
            try:
                for stream in (False, True):
                    status, text, took_s = await _ask(http, a.url, stream=stream)
                    assert status == 200, text
                    assert '"ok"' in text or "ok" in text
                    assert took_s < PEER_RESPONSE_START_TIMEOUT_S + SLACK_S, (stream, took_s, a.log_tail())
            finally:
                os.kill(b.pid, signal.SIGCONT)
    finally:
        for agent in (a, b):
            stop_agent(agent)
