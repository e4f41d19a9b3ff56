"""A real agent process downloads SmolLM2's GGUF file from a hub (the fake hub of `tests.helpers.hub`,
throttled, reached through `HF_ENDPOINT`) and serves it: while the download runs its progress is visible
in `GET /mesh/state` and in the `load_progress` events of `/mesh/events` (bytes done of the total, rate,
time left), and once it is done the model answers. The session's converted copy is the agent's GGUF
cache, so this measures the download, not the conversion."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.helpers.agentproc import (
    AgentProc,
    agent_argv,
    agent_env,
    get_state,
    start_agent,
    stop_agent,
    wait_ready,
)
from tests.helpers.hub import FakeHub, serve_in_thread
from tests.helpers.ports import free_port
from tests.helpers.smollm2 import GGUF_NAME, smollm2_gguf

pytestmark = pytest.mark.slow

REPO = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
# ~98 MB at this rate: about 4 s of download, long enough to watch, short enough for CI.
BYTES_PER_S = 25e6


async def _events(http: aiohttp.ClientSession, url: str, into: list[dict[str, Any]]) -> None:
    async with http.get(f"{url}/mesh/events", timeout=aiohttp.ClientTimeout(total=None)) as r:
        async for raw in r.content:
            line = raw.decode().strip()
            if line.startswith("data: "):
                into.append(json.loads(line[6:]))


@contextlib.asynccontextmanager
async def running_agent(root: Path, hub_url: str, smollm2_cache: Path) -> AsyncIterator[AgentProc]:
    state = root / "state"
    state.mkdir(parents=True)
    (state / "gguf").symlink_to(smollm2_cache, target_is_directory=True)
    catalogue = root / "models.toml"
    catalogue.write_text(f'[[models]]\nid = "smollm2"\nsource = "{REPO}:{GGUF_NAME}"\nkeep_alive = -1\n')
    port = free_port()
    env = agent_env(state, {"HF_ENDPOINT": hub_url, "HELEXA_HF_CACHE": str(root / "hf-cache")})
    agent = start_agent(
        name="dl",
        url=f"http://127.0.0.1:{port}",
        state_dir=state,
        argv=agent_argv(
            name="dl", port=port, state_dir=state, catalogue=catalogue, host="127.0.0.1", mdns=False
        ),
        env=env,
    )
    try:
        yield agent
    finally:
        await asyncio.to_thread(stop_agent, agent)


async def test_a_download_shows_its_progress_while_it_runs_then_the_model_answers(
    tmp_path: Path, smollm2_cache: Path
) -> None:
    served = tmp_path / "repo"
    served.mkdir()
    (served / GGUF_NAME).symlink_to(smollm2_gguf())
    size = smollm2_gguf().stat().st_size
    hub = FakeHub()
    hub.add_repo(REPO, served, bytes_per_s=BYTES_PER_S)
    with serve_in_thread(hub):
        async with aiohttp.ClientSession() as http, running_agent(tmp_path, hub.url, smollm2_cache) as agent:
            await wait_ready(http, [agent], timeout_s=60)
            events: list[dict[str, Any]] = []
            watcher = asyncio.create_task(_events(http, agent.url, events))
            await asyncio.sleep(0.2)
            load = asyncio.create_task(
                http.post(
                    f"{agent.url}/mesh/models/load",
                    json={"model": "smollm2"},
                    timeout=aiohttp.ClientTimeout(total=300),
                )
            )
            seen: list[dict[str, Any]] = []
            while not load.done():
                state = await get_state(http, agent.url)
                for node in state["nodes"]:
                    for m in node["models"]:
                        if m["id"] == "smollm2" and m["status"] == "loading" and m["phase"] == "downloading":
                            seen.append(m)
                await asyncio.sleep(0.1)
            response = await load
            assert response.status == 200, await response.text()
            response.release()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

            # Seen from outside while it ran: bytes growing towards the file's size, a rate, a time left.
            moving = [m for m in seen if 0 < m["done_bytes"] < size]
            assert len({m["done_bytes"] for m in moving}) >= 3, seen
            assert all(m["total_bytes"] == size for m in seen)
            done = [m["done_bytes"] for m in seen]
            assert done == sorted(done)
            assert all(m["bytes_per_s"] > 0 and m["eta_s"] is not None for m in moving)
            rates = [m["bytes_per_s"] for m in moving[len(moving) // 2 :]]
            assert max(rates) < 3 * BYTES_PER_S and min(rates) > BYTES_PER_S / 4, rates
            progress = [
                e for e in events if e.get("type") == "load_progress" and "done_bytes" in e.get("data", e)
            ]
            assert len(progress) >= 3, events[-5:]
            assert hub.seen("GET", GGUF_NAME), "the file came from the hub"

            client = openai.AsyncOpenAI(base_url=f"{agent.url}/v1", api_key="none", max_retries=0)
            async with client:
                reply = await client.chat.completions.create(
                    model="smollm2",
                    messages=[{"role": "user", "content": "What is the capital of France?"}],
                    temperature=0,
                    max_tokens=16,
                )
            assert reply.choices[0].message.content == "The capital of France is Paris."
