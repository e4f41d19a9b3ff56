"""An agent whose disk fails it (issue 12 items 8 and 11): a full state directory does not stop it from
starting or serving, a catalogue edit the disk refuses is a 507 that says what is full, and a catalogue
write killed half-way leaves nothing behind after the next start.

The full disk is real in the process test: a 256 KiB tmpfs, filled, mounted over the agent's state
directory in a mount namespace of its own (`unshare --mount`: as root, or with a user namespace
otherwise), so nothing is left mounted whatever happens to the test. The in-process test makes the
filesystem's `fsync` fail with ENOSPC instead.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from helexa.catalogue import store
from tests.helpers.agentproc import (
    REPO,
    AgentProc,
    agent_argv,
    start_agent,
    stop_agent,
    wait_listening,
    wait_ready,
)
from tests.helpers.agents import Fleet

CATALOGUE = """\
# the operator's catalogue
[[models]]
id = "fake/echo"
engine = "fake"
memory_mb = 100
options = { memory_mb = 100, echo = true }
"""
NEW_ENTRY = {"id": "fake/new", "engine": "fake", "memory_mb": 100}
CHAT = {"model": "fake/echo", "messages": [{"role": "user", "content": "still here"}]}
NODE_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def test_a_catalogue_edit_or_removal_on_a_full_disk_is_507_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http: aiohttp.ClientSession
) -> None:
    """The edit answered 500 "internal error" with no reason."""
    fleet = Fleet(tmp_path)
    try:
        agent = await fleet.start("full", catalogue_toml=CATALOGUE)
        path = agent.catalogue
        assert path is not None

        def no_space(_fd: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", no_space)
        async with http.post(f"{agent.url}/mesh/catalogue", json=NEW_ENTRY) as r:
            body = await r.json()
            assert r.status == 507, body
        error = body["error"]
        assert error["code"] == "insufficient_storage" and error["type"] == "server_error"
        assert f"cannot write the catalogue {path}: no space left on device" in error["message"]
        # Nothing changed: not in the mesh's catalogue, not in the file; what is there is still served.
        async with http.get(f"{agent.url}/mesh/catalogue") as r:
            assert [e["id"] for e in (await r.json())["data"]] == ["fake/echo"]
        assert path.read_text(encoding="utf-8") == CATALOGUE
        async with http.post(f"{agent.url}/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
        # A removal the disk refuses is a 507 too, and changes nothing (it answered 200 and kept the
        # entry in the file, so the model came back at the next start).
        async with http.delete(f"{agent.url}/mesh/catalogue/fake/echo") as r:
            body = await r.json()
            assert r.status == 507, body
        assert "no space left on device" in body["error"]["message"]
        async with http.get(f"{agent.url}/mesh/catalogue") as r:
            assert [e["id"] for e in (await r.json())["data"]] == ["fake/echo"]
        assert path.read_text(encoding="utf-8") == CATALOGUE
        monkeypatch.undo()
        async with http.delete(f"{agent.url}/mesh/catalogue/fake/echo") as r:
            assert r.status == 200, await r.text()
        assert "fake/echo" not in path.read_text(encoding="utf-8")
    finally:
        await fleet.close()


def _namespace_prefix() -> list[str]:
    """`unshare` arguments for a private mount namespace this user may mount a tmpfs in (skip if none)."""
    if shutil.which("unshare") is None or sys.platform != "linux":
        pytest.skip("needs util-linux unshare (Linux)")
    prefix = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--map-root-user", "--mount"]
    probe = subprocess.run(
        [*prefix, "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a mount namespace here: {probe.stderr.decode().strip()}")
    return prefix


# In the agent's own mount namespace: a small tmpfs over the state directory holding the catalogue and
# the node id of an earlier run, filled to the last block, then the agent.
_FILL_AND_RUN = """\
set -e
mount -t tmpfs -o size=256k tmpfs "$STATE"
printf '%s' "$CATALOGUE_TEXT" > "$STATE/models.toml"
printf '%s\\n' "$NODE_ID" > "$STATE/node-id"
printf '1000\\n' > "$STATE/generation"
dd if=/dev/zero of="$STATE/fill" bs=4096 2>/dev/null || true
exec "$@"
"""


async def test_an_agent_whose_state_dir_is_full_starts_serves_and_says_what_is_full(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The agent exited 1 at start (the generation could not be recorded)."""
    prefix = _namespace_prefix()
    state = tmp_path / "state"
    argv = agent_argv(
        name="full", port=0, host="127.0.0.1", state_dir=state, catalogue=state / "models.toml", mdns=False
    )
    env = {
        **os.environ,
        "STATE": str(state),
        "CATALOGUE_TEXT": CATALOGUE,
        "NODE_ID": NODE_ID,
        "HOME": str(tmp_path),
        "PYTHONPATH": str(REPO),
    }
    env = {k: v for k, v in env.items() if not k.startswith("HELEXA_")}
    agent: AgentProc = start_agent(
        name="full", url="", state_dir=state, argv=[*prefix, "sh", "-c", _FILL_AND_RUN, "sh", *argv], env=env
    )
    try:
        await wait_listening(agent)
        await wait_ready(http, [agent], timeout_s=30)
        log = agent.log_text()
        assert f"cannot write {state}/generation: no space left on device" in log, log
        async with http.get(f"{agent.url}/mesh/state") as r:
            assert (await r.json())["self"] == NODE_ID  # the id on disk, not a new one
        # It serves what its catalogue lists...
        async with http.post(f"{agent.url}/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["choices"][0]["message"]["content"] == "still here"
        # ...and an edit says what is full instead of a bare 500.
        async with http.post(f"{agent.url}/mesh/catalogue", json=NEW_ENTRY) as r:
            body = await r.json()
            assert r.status == 507, body
        assert f"cannot write the catalogue {state}/models.toml: no space left on device" in str(body)
        assert "Traceback" not in agent.log_text()
        assert stop_agent(agent) == 0, agent.log_tail()
    finally:
        stop_agent(agent)


_KILLED_WRITER = """
import os, signal, sys
from helexa.catalogue import store
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
store.add_entry(sys.argv[1], {"id": "fake/new", "engine": "fake", "memory_mb": 100})
"""


async def test_a_catalogue_write_killed_midway_leaves_nothing_after_the_next_start(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """SIGKILL during a catalogue write left its temp file behind for good."""
    catalogue = tmp_path / "models.toml"
    catalogue.write_text(CATALOGUE, encoding="utf-8")
    killed = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _KILLED_WRITER,
        str(catalogue),
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await killed.communicate()
    assert killed.returncode == -signal.SIGKILL, stderr.decode()
    (leftover,) = list(tmp_path.glob(".models.toml.*.tmp"))  # noqa: ASYNC240  # a test's own tmp folder
    old = time.time() - store.STALE_TEMP_MIN_AGE_S - 1
    os.utime(leftover, (old, old))
    state = tmp_path / "state"
    argv = agent_argv(
        name="after", port=0, host="127.0.0.1", state_dir=state, catalogue=catalogue, mdns=False
    )
    agent = start_agent(name="after", url="", state_dir=state, argv=argv)
    try:
        await wait_listening(agent)
        await wait_ready(http, [agent], timeout_s=30)
        assert not leftover.exists()
        assert f"left behind: {leftover.name}" in agent.log_text()
        assert catalogue.read_text(encoding="utf-8") == CATALOGUE
    finally:
        stop_agent(agent)
