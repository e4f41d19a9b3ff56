"""`helexa agent` as a real process: binds, answers /healthz, stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path

import aiohttp

from tests.helpers.agentproc import agent_command, agent_env

LISTENING = re.compile(rb"listening on (http://[\d.]+:\d+)")


async def _start_agent(tmp_path: Path, *args: str) -> tuple[asyncio.subprocess.Process, str, list[bytes]]:
    env = agent_env(tmp_path, {"HELEXA_STATE_DIR": str(tmp_path / "state")})
    proc = await asyncio.create_subprocess_exec(
        *agent_command(),
        "agent",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--no-mdns",  # hermetic: no multicast on the test host's interfaces
        *args,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    lines: list[bytes] = []
    async with asyncio.timeout(30):
        while True:
            line = await proc.stderr.readline()
            assert line, b"".join(lines).decode()
            lines.append(line)
            if m := LISTENING.search(line):
                return proc, m.group(1).decode(), lines


async def test_agent_process_serves_health_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc, url, lines = await _start_agent(tmp_path, "--name", "proc-test")
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/healthz") as r:
                assert r.status == 200
                body = await r.json()
            assert body["status"] == "ok" and body["node"] == "proc-test"
            async with http.get(f"{url}/v1/models") as r:
                assert r.status == 200
                assert (await r.json())["object"] == "list"
        # The default catalogue was created in the state directory, and the node id persisted.
        assert (tmp_path / "state" / "models.toml").is_file()
        assert (tmp_path / "state" / "node-id").is_file()
        proc.send_signal(signal.SIGTERM)
        assert proc.stderr is not None
        async with asyncio.timeout(15):
            rest = await proc.stderr.read()
            rc = await proc.wait()
        assert rc == 0, (b"".join(lines) + rest).decode()
        assert b"stopped" in rest
        assert b"Traceback" not in b"".join(lines) + rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_bad_configuration_exits_2_with_one_line(tmp_path: Path) -> None:
    env = agent_env(tmp_path, {"HELEXA_PORT": "eighty"})
    proc = await asyncio.create_subprocess_exec(
        *agent_command(),
        "agent",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _out, err = await proc.communicate()
    assert proc.returncode == 2
    assert err.decode().strip().splitlines() == [
        "helexa agent: bad port 'eighty' from environment HELEXA_PORT: must be an integer 0..65535"
    ]
