"""Connection abuse against a real agent's HTTP server (issue 12 item 9): idle connections, slow headers,
a slow body, a client that stops reading a stream, and a connection flood.

Before: aiohttp's keep-alive timer (an hour by default) was the only bound, so 600 idle or slow
connections were all held (up to the file-descriptor limit), a body could trickle forever, and a client
that stopped reading held its model reservation forever. The agents here are real (`start_agent`, real
sockets, the fake engine) with every bound shrunk (`ServerLimits`); `test_the_idle_timeout_is_a_setting`
runs a real `helexa agent` process with the operator's setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from helexa.mesh.server.connections import ServerLimits
from tests.helpers.agentproc import agent_argv, start_agent, stop_agent, wait_listening
from tests.helpers.agents import Fleet, Member, entry
from tests.helpers.polling import eventually

LIMITS = ServerLimits(
    idle_timeout_s=0.5,
    body_timeout_s=0.5,
    write_stall_timeout_s=0.5,
    send_buffer_bytes=16 * 1024,
    linger_s=0.2,
    max_connections=30,
    refused_wait_s=0.2,
)
# A stream as long as its prompt (the fake engine echoes the prompt's words), as fast as it can go.
FIREHOSE = entry("fake/firehose", options={"echo": True, "context_length": 10**7}, context_length=10**7)
SLACK_S = 1.5  # a loaded test machine's scheduling delay on top of a bound


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Member]:
    fleet = Fleet(tmp_path)
    try:
        yield await fleet.start("abused", entries=[FIREHOSE], limits=LIMITS)
    finally:
        await fleet.close()


async def _connect(member: Member) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", member.port)


async def _closed_after(
    reader: asyncio.StreamReader, started: float, *, limit_s: float
) -> tuple[float, bytes]:
    """Read until the server closes the connection; how long after `started` it did, and what it sent."""
    data = b""
    async with asyncio.timeout(limit_s):
        while chunk := await reader.read(65536):
            data += chunk
    return time.monotonic() - started, data


def _status_and_body(data: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


async def test_idle_connections_are_closed_after_the_idle_timeout(agent: Member) -> None:
    started = time.monotonic()
    connections = [await _connect(agent) for _ in range(20)]
    held = [await _closed_after(r, started, limit_s=LIMITS.idle_timeout_s + SLACK_S) for r, _ in connections]
    assert all(LIMITS.idle_timeout_s * 0.8 <= t for t, _ in held), held
    assert all(data == b"" for _, data in held)
    for _, w in connections:
        w.close()
    # A keep-alive connection that goes idle after a request is closed the same way.
    reader, writer = await _connect(agent)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answered = time.monotonic()
    _, data = await _closed_after(reader, answered, limit_s=LIMITS.idle_timeout_s + SLACK_S)
    assert data.startswith(b"HTTP/1.1 200")
    writer.close()


async def test_slow_headers_are_cut_off(agent: Member) -> None:
    reader, writer = await _connect(agent)
    started = time.monotonic()

    async def trickle() -> None:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        with contextlib.suppress(ConnectionError):
            for i in range(100):
                writer.write(f"X-Slow-{i}: y\r\n".encode())
                await writer.drain()
                await asyncio.sleep(0.05)

    sender = asyncio.create_task(trickle())
    try:
        held_s, data = await _closed_after(reader, started, limit_s=LIMITS.idle_timeout_s + SLACK_S)
    finally:
        sender.cancel()
        writer.close()
    assert data == b"" and held_s < LIMITS.idle_timeout_s + SLACK_S


async def test_a_slow_body_gets_408_and_never_reaches_a_handler(agent: Member) -> None:
    reader, writer = await _connect(agent)
    started = time.monotonic()
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{"
    )

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(100):
                writer.write(b" ")
                await writer.drain()
                await asyncio.sleep(0.05)

    sender = asyncio.create_task(trickle())
    try:
        held_s, data = await _closed_after(
            reader, started, limit_s=LIMITS.body_timeout_s + LIMITS.linger_s + SLACK_S
        )
    finally:
        sender.cancel()
        writer.close()
    status, body = _status_and_body(data)
    assert status == 408 and body["error"]["code"] == "request_timeout"  # type: ignore[index]
    assert b"Connection: close" in data
    assert held_s < LIMITS.body_timeout_s + LIMITS.linger_s + SLACK_S
    assert agent.engine.loads[FIREHOSE.id] == 0  # the request never got as far as the model


async def test_a_client_that_stops_reading_releases_its_model(
    agent: Member, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "helexa.mesh.server.connections")
    words = " ".join(f"w{i}" for i in range(200_000))
    body = json.dumps({"model": FIREHOSE.id, "prompt": words, "stream": True}).encode()
    reader, writer = await _connect(agent)
    # A small receive window, so the buffers between us fill fast.
    writer.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    reader._transport.pause_reading()  # type: ignore[attr-defined]  # read nothing from here on

    def in_flight() -> int:
        record = agent.agent.neuron.record(FIREHOSE.id)
        return 0 if record is None else record.in_flight

    await eventually(lambda: in_flight() == 1, what="the stream to start")
    stalled_at = time.monotonic()
    released_at = await eventually(
        lambda: in_flight() == 0, timeout_s=LIMITS.write_stall_timeout_s + 10, what="the model released"
    )
    assert released_at - stalled_at < LIMITS.write_stall_timeout_s + 10
    assert "read nothing for" in caplog.text and agent.running.guard.stalled == 1
    writer.close()
    # The agent still serves.
    assert await _get_status(agent, "/healthz") == 200


async def _get_status(member: Member, path: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"{member.url}{path}") as r:
        return r.status


async def test_past_the_connection_limit_new_connections_get_503_then_are_accepted_again(
    tmp_path: Path,
) -> None:
    limits = dataclasses.replace(LIMITS, idle_timeout_s=30.0)  # the held connections stay for the test
    n = limits.max_connections
    fleet = Fleet(tmp_path)
    try:
        agent = await fleet.start("flooded", entries=[FIREHOSE], limits=limits)
        guard = agent.running.guard
        # A burst of twice the limit at once: exactly the limit is accepted (held open), the rest are
        # answered 503 and closed.
        burst = await asyncio.gather(*(_connect(agent) for _ in range(2 * n)))
        await eventually(lambda: guard.refused == n, what=f"{n} refused (seen {guard.refused})")
        assert guard.open == n
        answers = await asyncio.gather(
            *(
                _closed_after(r, time.monotonic(), limit_s=limits.refused_wait_s + SLACK_S)
                for r, _ in burst[n:]
            )
        )
        for _, data in answers:
            status, body = _status_and_body(data)
            assert status == 503 and body["error"]["code"] == "too_many_connections"  # type: ignore[index]
            assert b"Retry-After: 1" in data and b"Connection: close" in data
        # A refused client that sends its request gets the answer at once.
        reader, writer = await _connect(agent)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        waited_s, data = await _closed_after(reader, time.monotonic(), limit_s=5)
        assert data.startswith(b"HTTP/1.1 503") and waited_s < limits.refused_wait_s
        writer.close()
        # Room again once some close.
        for _, w in burst[:5]:
            w.close()
        await eventually(lambda: guard.open <= n - 5, what="closed ones gone")
        assert await _get_status(agent, "/healthz") == 200
        for _, w in burst[5:]:
            w.close()
    finally:
        await fleet.close()


async def test_the_idle_timeout_is_a_setting(tmp_path: Path) -> None:
    """The operator's `--http-idle-timeout` reaches a real agent's server."""
    catalogue = tmp_path / "models.toml"
    catalogue.write_text("", encoding="utf-8")
    argv = agent_argv(
        name="idle",
        port=0,
        host="127.0.0.1",
        state_dir=tmp_path / "state",
        catalogue=catalogue,
        mdns=False,
        extra=["--http-idle-timeout", "1"],
    )
    proc = start_agent(name="idle", url="", state_dir=tmp_path / "state", argv=argv)
    try:
        url = await wait_listening(proc)
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        held_s, _ = await _closed_after(reader, time.monotonic(), limit_s=1 + 3 * SLACK_S)
        writer.close()
        assert 0.8 <= held_s < 1 + 3 * SLACK_S
    finally:
        stop_agent(proc)
