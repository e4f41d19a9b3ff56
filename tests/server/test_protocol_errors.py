"""Requests aiohttp cannot parse (issue 12 item 10): oversize headers, a NUL in a header, bad chunking, an
unknown method. They were answered in plain text (quoting the offending bytes back) and logged with a
traceback that quoted them too, the start of an oversize `Authorization` header included. Now: the OpenAI
envelope, and one log line per client that names what was wrong, never the bytes.

Raw sockets against a real agent's server: in-process (its log through `caplog`) and as a real
`helexa agent` process (its log file, as an operator reads it).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers.agentproc import agent_argv, start_agent, stop_agent, wait_listening
from tests.helpers.agents import Fleet, Member, entry

SECRET = "sk-helexa-secret-0123456789"
BAD_REQUESTS: dict[str, tuple[bytes, str]] = {
    "oversize authorization": (
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + SECRET.encode()
        + b"A" * 9000
        + b"\r\n\r\n",
        "header_too_large",
    ),
    "oversize header name": (
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"X" * 9000 + b": y\r\n\r\n",
        "header_too_large",
    ),
    "NUL in a header": (
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + SECRET.encode() + b"\x00\r\n\r\n",
        "malformed_request",
    ),
    "bad chunking": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nZZ" + SECRET.encode() + b"\r\nabc\r\n0\r\n\r\n",
        "malformed_request",
    ),
    "unknown method": (b"FR\x01B /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", "bad_method"),
    "not HTTP": (
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + SECRET.encode() + b"\r\n\r\n",
        "bad_method",
    ),
}


async def _send(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


def _assert_envelope(data: bytes, code: str) -> dict[str, object]:
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"400", data[:200]
    assert b"Content-Type: application/json" in head, head
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == code, error
    assert SECRET not in body.decode(errors="replace") and "AAAA" not in error["message"]
    return dict(error)


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Member]:
    fleet = Fleet(tmp_path)
    try:
        yield await fleet.start("strict", entries=[entry("fake/m")])
    finally:
        await fleet.close()


@pytest.mark.parametrize("kind", list(BAD_REQUESTS))
async def test_malformed_requests_get_the_envelope_and_a_log_line_without_their_bytes(
    agent: Member, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    raw, code = BAD_REQUESTS[kind]
    _assert_envelope(await _send(agent.port, raw), code)
    assert SECRET not in caplog.text and "Traceback" not in caplog.text and "AAAAAAAA" not in caplog.text
    assert "refused a malformed request from 127.0.0.1" in caplog.text
    # The server is fine afterwards.
    ok = await _send(agent.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200")


async def test_a_body_that_breaks_off_is_a_400_not_a_500(
    agent: Member, caplog: pytest.LogCaptureFixture
) -> None:
    """Valid headers, then a chunk size that is not hex in a later packet (the handler already runs)."""
    caplog.set_level(logging.DEBUG)
    reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n"
        )
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(b"ZZ" + SECRET.encode() + b"\r\n")
        async with asyncio.timeout(10):
            data = await reader.read()
    finally:
        writer.close()
    error = _assert_envelope(data, "malformed_request")
    assert str(error["message"]).startswith("malformed request body")
    assert SECRET not in caplog.text and "Traceback" not in caplog.text


async def test_a_real_agent_logs_no_credentials_or_raw_bytes(tmp_path: Path) -> None:
    catalogue = tmp_path / "models.toml"
    catalogue.write_text("", encoding="utf-8")
    state = tmp_path / "state"
    argv = agent_argv(name="logs", port=0, host="127.0.0.1", state_dir=state, catalogue=catalogue, mdns=False)
    proc = start_agent(name="logs", url="", state_dir=state, argv=[*argv, "--log-level", "debug"])
    try:
        url = await wait_listening(proc)
        port = int(url.rsplit(":", 1)[1])
        for raw, code in BAD_REQUESTS.values():
            _assert_envelope(await _send(port, raw), code)
        assert stop_agent(proc) == 0
        log = proc.log_text()
        assert "refused a malformed request from 127.0.0.1: a header or the request line is too long" in log
        assert SECRET not in log and "Traceback" not in log and "AAAAAAAA" not in log
    finally:
        stop_agent(proc)
