"""Stopping a running agent (in process): the drain is bounded, what still runs after it is ended at once
with a final SSE error event, and a second signal (`now`) cuts the drain short."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from helexa.engine.fake import FakeEngine
from helexa.mesh import timing
from helexa.mesh.config import load_config
from helexa.mesh.process import RunningAgent, start_agent
from tests.helpers.agents import FAST, StaticHardware, entry

# A stream far longer than any drain here: 200 tokens 0.05 s apart.
LONG = entry("org/long", options={"tokens": ["x"] * 200, "token_delay_s": 0.05})


async def _agent(tmp_path: Path, drain_timeout_s: float) -> RunningAgent:
    argv = ["--name", "s", "--host", "127.0.0.1", "--port", "0", "--no-mdns"]
    argv += ["--state-dir", str(tmp_path / "state"), "--drain-timeout", str(drain_timeout_s)]
    config = load_config(argv, {"HOME": str(tmp_path)})
    engine = FakeEngine()
    return await start_agent(
        config,
        engine_for=lambda e, d: engine,
        hardware=StaticHardware(engine, 1000),
        catalogue=[LONG],
        neuron_timing=FAST,
    )


async def _open_stream(running: RunningAgent) -> tuple[Any, Any]:
    client = openai.AsyncOpenAI(base_url=f"{running.url}/v1", api_key="none", max_retries=0)
    stream = await client.chat.completions.create(
        model="org/long", messages=[{"role": "user", "content": "x"}], stream=True
    )
    chunks = aiter(stream)
    await anext(chunks)
    return client, chunks


async def _read_to_the_end(chunks: Any) -> str:
    """Read the rest of the stream; the error the SDK raises for the final error event."""
    with pytest.raises(openai.APIError) as info:
        async for _ in chunks:
            pass
    return str(info.value)


async def test_what_outlives_the_drain_is_ended_with_an_error_event(tmp_path: Path) -> None:
    running = await _agent(tmp_path, drain_timeout_s=0.5)
    client, chunks = await _open_stream(running)
    async with client:
        reader = asyncio.create_task(_read_to_the_end(chunks))
        await running.stop()
        message = await asyncio.wait_for(reader, timeout=10)
    assert "shutting down" in message
    assert running.agent.draining


@pytest.mark.parametrize(
    ("path", "body", "error_line"),
    [
        (
            "/v1/messages",
            {
                "model": "org/long",
                "max_tokens": 300,
                "messages": [{"role": "user", "content": "x"}],
                "stream": True,
            },
            b"event: error",
        ),
        ("/v1/responses", {"model": "org/long", "input": "x", "stream": True}, b'data: {"error":'),
    ],
)
async def test_the_other_streaming_apis_end_in_their_own_error_frame(
    tmp_path: Path, path: str, body: dict[str, Any], error_line: bytes
) -> None:
    """Anthropic's and the Responses stream, outliving the drain, end with their route's error frame."""
    running = await _agent(tmp_path, drain_timeout_s=0.5)
    async with aiohttp.ClientSession() as session, session.post(f"{running.url}{path}", json=body) as resp:
        assert resp.status == 200
        await resp.content.readline()  # the stream has started
        stop = asyncio.create_task(running.stop())
        lines: list[bytes] = []

        async def read() -> None:
            with contextlib.suppress(aiohttp.ClientPayloadError):  # the connection closes after the frame
                async for line in resp.content:
                    lines.append(line.rstrip())

        await asyncio.wait_for(read(), timeout=10)
        await stop
    tail = [line for line in lines if line][-3:]
    assert any(error_line in line for line in tail), tail
    assert b"shutting down" in b"".join(tail)


async def test_a_second_signal_cuts_the_drain_short(tmp_path: Path) -> None:
    running = await _agent(tmp_path, drain_timeout_s=60)
    client, chunks = await _open_stream(running)
    async with client:
        reader = asyncio.create_task(_read_to_the_end(chunks))
        now = asyncio.Event()
        stopping = asyncio.create_task(running.stop(now=now))
        await asyncio.sleep(0.2)
        assert not stopping.done()  # draining: the stream would hold it for ten seconds
        now.set()
        await asyncio.wait_for(stopping, timeout=10)  # far below the 60 s drain and the stream's 10 s
        assert "shutting down" in await asyncio.wait_for(reader, timeout=10)


async def test_an_open_event_stream_does_not_hold_the_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dashboard's `/mesh/events` stream ends cleanly when the agent stops, instead of holding the
    runner's cleanup for aiohttp's whole shutdown timeout (made a minute here, so a held stop shows)."""
    monkeypatch.setattr(timing, "SHUTDOWN_TIMEOUT_S", 60.0)
    running = await _agent(tmp_path, drain_timeout_s=0.5)
    async with aiohttp.ClientSession() as session, session.get(f"{running.url}/mesh/events") as resp:
        assert resp.status == 200
        assert await resp.content.readline() == b": connected\n"
        await asyncio.wait_for(running.stop(), timeout=20)  # held, it would take the 60 s
        # The stream ended cleanly (its last chunk sent), not cut when the connection closed.
        await asyncio.wait_for(resp.content.read(), timeout=5)
    assert running.agent.mesh.bus.subscribers == 0
