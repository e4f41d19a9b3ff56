"""A bounded soak (slow set): many streamed and non-streamed requests through an entry agent to the agent
that serves the model, a share of the clients leaving mid-stream, some requests malformed. Nothing is lost
(every completed request got its whole answer), nothing leaks (no request left in flight, no open
connection held), and the agents keep answering."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import orjson
import pytest

from helexa.mesh.server.inference import OPEN_REQUESTS
from tests.helpers.agents import Fleet, entry
from tests.helpers.polling import eventually

WORDS = [f" w{i}" for i in range(12)]
REQUESTS = 400
CONCURRENCY = 24


@pytest.mark.slow
async def test_soak_through_an_entry_agent(fleet: Fleet) -> None:
    entries = [entry("org/soak", options={"tokens": WORDS, "token_delay_s": 0.002})]
    a, b = await fleet.serving_pair(entries, "org/soak")
    rng = random.Random(7)
    outcomes: dict[str, int] = {"whole": 0, "left": 0, "rejected": 0}
    expected = "".join(WORDS)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        kind = rng.choice(["stream", "stream", "plain", "leave", "bad"])
        body: dict[str, object] = {"model": "org/soak", "messages": [{"role": "user", "content": f"q{i}"}]}
        async with gate:
            if kind == "bad":
                async with session.post(
                    f"{a.url}/v1/chat/completions", data=b'{"model": "org/soak", "messages": 7}'
                ) as r:
                    assert r.status == 400
                    outcomes["rejected"] += 1
                return
            if kind == "plain":
                async with session.post(f"{a.url}/v1/chat/completions", json=body) as r:
                    assert r.status == 200
                    assert (await r.json())["choices"][0]["message"]["content"] == expected
                    outcomes["whole"] += 1
                return
            async with session.post(f"{a.url}/v1/chat/completions", json={**body, "stream": True}) as r:
                assert r.status == 200
                text = ""
                async for line in r.content:
                    if kind == "leave" and text:
                        outcomes["left"] += 1
                        return  # leaving mid-stream closes the connection
                    if line.startswith(b"data: {"):
                        chunk = orjson.loads(line[6:])
                        assert "error" not in chunk, chunk
                        text += chunk["choices"][0]["delta"].get("content") or ""
                assert text == expected
                outcomes["whole"] += 1

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session, i) for i in range(REQUESTS)))
    assert sum(outcomes.values()) == REQUESTS and outcomes["whole"] > REQUESTS / 3 and outcomes["left"] > 0

    def idle() -> bool:
        record = b.agent.neuron.record("org/soak")
        return record is not None and record.in_flight == 0 and record.queued == 0

    await eventually(idle, timeout_s=10.0, what="every request to leave the serving agent")
    # Both agents still answer, and hold no request.
    async with aiohttp.ClientSession() as session:
        for member in (a, b):
            async with session.get(f"{member.url}/healthz") as r:
                assert r.status == 200
    assert not a.running.app[OPEN_REQUESTS].tasks and not b.running.app[OPEN_REQUESTS].tasks
