"""Graceful shutdown of a real `helexa agent` process (issue 5): SIGTERM stops admitting work (503 with
`Retry-After`), lets the stream in flight finish, announces the leave (a peer marks it `left`, never
`dead`), exits 0 within the drain timeout; a second SIGTERM, or the drain timeout, ends it at once.

Agents run on loopback with static peers and no mDNS; the models (`models.toml` here) are fake-engine
scripts pinned on the agent being stopped, so nothing can be served elsewhere. The time bounds asserted
are the issue's acceptance criteria with generous slack, not performance measurements.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.helpers.agentproc import (
    AgentProc,
    agent_argv,
    get_state,
    liveness,
    start_agent,
    wait_listening,
    wait_ready,
)
from tests.helpers.polling import eventually

pytestmark = pytest.mark.slow

CATALOGUE = Path(__file__).with_name("models.toml")
MESSAGES: Any = [{"role": "user", "content": "hello"}]
# The agent's bound on closing connections after the drain (mesh.timing.SHUTDOWN_TIMEOUT_S) plus start-up
# slack of a loaded machine: what "at once" may take at most here.
AT_ONCE_S = 5.0
# The failure detector's dead_after (mesh.timing.DEAD_AFTER_S) plus a round: a silently vanished peer
# would be dead by then, so a peer still showing `left` this long after the exit really took the leave.
LONGER_THAN_DEAD_S = 10.0

Starter = Callable[..., Awaitable[AgentProc]]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Starter]:
    """`await start(name, *flags, peers=[...])`: an agent on 127.0.0.1, port 0, ready; killed at the end."""
    started: list[AgentProc] = []

    async def _start(name: str, *flags: str, peers: tuple[str, ...] = ()) -> AgentProc:
        state_dir = tmp_path / name
        argv = agent_argv(
            name=name,
            port=0,
            host="127.0.0.1",
            state_dir=state_dir,
            catalogue=CATALOGUE,
            peers=peers,
            mdns=False,
            extra=flags,
        )
        agent = start_agent(name=name, url="", state_dir=state_dir, argv=argv)
        started.append(agent)
        await wait_listening(agent)
        async with aiohttp.ClientSession() as http:
            await wait_ready(http, [agent], timeout_s=30)
        return agent

    yield _start
    while _clients:
        with contextlib.suppress(Exception):
            await _clients.pop().close()
    for agent in started:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait(timeout=10)


# Every SDK client a test opens, closed by the `start` fixture before the loop ends: a client left to the
# garbage collector after its agent died mid-stream warns about an unclosed transport (an error here).
_clients: list[openai.AsyncOpenAI] = []


def client(agent: AgentProc) -> openai.AsyncOpenAI:
    c = openai.AsyncOpenAI(base_url=f"{agent.url}/v1", api_key="unused", max_retries=0, timeout=60)
    _clients.append(c)
    return c


async def exit_status(agent: AgentProc, timeout_s: float) -> tuple[int, float]:
    """Wait for the process to exit: (status, seconds waited). Fails with the log if it does not."""
    assert agent.proc is not None
    started = time.monotonic()
    try:
        rc = await asyncio.to_thread(agent.proc.wait, timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"{agent.name} still running {timeout_s:g} s later:\n{agent.log_tail()}"
        ) from None
    return rc, time.monotonic() - started


# What counts as "not yet" while polling an agent: a refused connection, or an assertion in the check.
NOT_YET = (aiohttp.ClientError, TimeoutError, AssertionError)


async def start_stream(agent: AgentProc, model: str) -> tuple[Any, Any, str]:
    """Open a stream and read until the first token arrived (the request is in flight on the engine):
    (the stream, its chunk iterator, the text so far)."""
    stream = await client(agent).chat.completions.create(model=model, messages=MESSAGES, stream=True)
    chunks = aiter(stream)
    text = ""
    while not text:
        chunk = await asyncio.wait_for(anext(chunks), timeout=30)
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    return stream, chunks, text


async def test_sigterm_finishes_the_stream_refuses_new_work_exits_0_and_the_peer_sees_left(
    start: Starter,
) -> None:
    target = await start("target", "--drain-timeout", "10")
    port = target.url.rsplit(":", 1)[1]
    peer = await start("peer", peers=(f"127.0.0.1:{port}",))
    async with aiohttp.ClientSession() as http:

        async def peer_sees_target_alive() -> bool:
            return liveness(await get_state(http, peer.url)).get("target") == "alive"

        await eventually(
            peer_sees_target_alive,
            timeout_s=10,
            what="the peer never saw the target alive",
            interval_s=0.1,
            retry_on=NOT_YET,
        )

        stream, chunks, text = await start_stream(target, "shut/stream")
        assert target.proc is not None
        target.proc.send_signal(signal.SIGTERM)
        term_at = time.monotonic()

        # A new request while draining: 503 with Retry-After (the model is pinned on the target only).
        async def refused() -> bool:
            async with http.post(
                f"{target.url}/v1/chat/completions", json={"model": "shut/stream", "messages": MESSAGES}
            ) as r:
                body = await r.json()
                assert r.status == 503, (r.status, body)
                retry_after = r.headers.get("Retry-After", "")
                assert retry_after.isdigit() and int(retry_after) >= 1, (dict(r.headers), body)
                assert body["error"]["code"], body
                return True

        await eventually(
            refused,
            timeout_s=2,
            what=f"no 503 with Retry-After during the drain\n{target.log_tail()}",
            interval_s=0.1,
            retry_on=NOT_YET,
        )

        finish = None
        try:
            async for chunk in chunks:  # the stream in flight runs to its end
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
        finally:
            await stream.close()
        assert text == "".join(f" w{i:02d}" for i in range(30)).lstrip(), text
        assert finish == "stop"

        rc, _ = await exit_status(target, timeout_s=10 - (time.monotonic() - term_at) + 1)
        exited_at = time.monotonic()
        log = target.log_text()
        assert rc == 0, log[-3000:]
        assert exited_at - term_at < 10, (
            f"exit {exited_at - term_at:.1f} s after SIGTERM (drain timeout 10 s)"
        )
        assert "Traceback" not in log, log[-3000:]

        async def peer_sees_left() -> bool:
            return liveness(await get_state(http, peer.url)).get("target") == "left"

        await eventually(
            peer_sees_left,
            timeout_s=3,
            what=f"the peer did not mark the stopped target left\n{peer.log_tail()}",
            interval_s=0.1,
            retry_on=NOT_YET,
        )
        # ... and it stays left (not dead) past the time a silent peer would have been declared dead.
        await asyncio.sleep(max(0.0, exited_at + LONGER_THAN_DEAD_S - time.monotonic()))
        assert liveness(await get_state(http, peer.url)).get("target") == "left", peer.log_tail()


async def test_second_sigterm_ends_the_drain_at_once(start: Starter) -> None:
    target = await start("target", "--drain-timeout", "60")
    stream, _, _ = await start_stream(target, "shut/long")  # 30 s: would hold the drain
    assert target.proc is not None
    target.proc.send_signal(signal.SIGTERM)
    async with aiohttp.ClientSession() as http:

        async def draining() -> bool:
            async with http.get(f"{target.url}/healthz") as r:
                return bool((await r.json()).get("status") == "draining")

        await eventually(
            draining,
            timeout_s=3,
            what=f"/healthz never said draining\n{target.log_tail()}",
            interval_s=0.1,
            retry_on=NOT_YET,
        )
    target.proc.send_signal(signal.SIGTERM)
    rc, took_s = await exit_status(target, timeout_s=AT_ONCE_S + 5)
    assert took_s < AT_ONCE_S, f"a second SIGTERM took {took_s:.1f} s to end the agent (rc {rc})"
    await stream.close()


async def test_drain_timeout_ends_it(start: Starter) -> None:
    target = await start("target", "--drain-timeout", "2")
    stream, _, _ = await start_stream(target, "shut/long")
    assert target.proc is not None
    target.proc.send_signal(signal.SIGTERM)
    rc, took_s = await exit_status(target, timeout_s=2 + AT_ONCE_S + 5)
    assert rc == 0, target.log_tail()
    assert took_s < 2 + AT_ONCE_S, f"drain timeout 2 s, but the agent took {took_s:.1f} s to exit"
    await stream.close()
