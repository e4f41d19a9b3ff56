"""`helexa status|models|load|unload|chat|key` run as a subprocess (as from a shell) against real agents:
what an operator sees on stdout/stderr, the exit codes, and that each command really changed the fleet
(checked through the agent's own `/mesh/state`, `/v1/models` and its models.toml)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from helexa.engine.base import ModelId
from tests.helpers.agents import Fleet, Member
from tests.helpers.polling import eventually
from tests.helpers.ports import free_port

from .conftest import CATALOGUE_TOML

pytestmark = pytest.mark.slow  # every command is a fresh Python process

HELEXA = str(Path(sys.executable).with_name("helexa"))
SMALL = ModelId("e2e/small")
COMMENT = "# e2e catalogue: this comment must survive edits made through the agent."


@dataclass(frozen=True, kw_only=True)
class Result:
    rc: int
    out: str
    err: str


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELEXA_")}
    env["NO_COLOR"] = "1"
    return env | extra


async def helexa(*argv: str, agent: Member | str | None = None, env: dict[str, str] | None = None) -> Result:
    """Run `helexa ARGV --agent URL` to completion (the agents keep serving on this loop meanwhile)."""
    args = list(argv)
    if agent is not None:
        args += ["--agent", agent if isinstance(agent, str) else agent.url]
    proc = await asyncio.create_subprocess_exec(
        HELEXA, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env(**(env or {}))
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return Result(rc=proc.returncode, out=out.decode(), err=err.decode())


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {text!r}"
    return lines[0]


async def test_status_table_and_json(agents: Fleet) -> None:
    alpha = await agents.start("alpha", catalogue_toml=CATALOGUE_TOML)
    table = await helexa("status", agent=alpha)
    assert table.rc == 0, table.err
    assert f"agent {alpha.url}" in table.out and "mesh default" in table.out and "OPEN" in table.out
    node_line = next(line for line in table.out.splitlines() if line.startswith("alpha "))
    assert f"127.0.0.1:{alpha.port}" in node_line and "alive" in node_line and "0.0G/1.0G" in node_line
    assert "no models loaded" in table.out
    assert "1 nodes (1 alive), 0 model instances, 2 catalogue entries" in table.out

    result = await helexa("status", "--json", agent=alpha)
    assert result.rc == 0, result.err
    data = json.loads(result.out)
    direct = await agents.state(alpha)
    # The same document as GET /mesh/state (heartbeats move between the two reads).
    assert data.keys() == direct.keys() == {"mesh", "open", "self", "agent_version", "nodes", "catalogue"}
    assert (data["mesh"], data["open"], data["self"]) == ("default", True, alpha.node_id)
    assert [n["id"] for n in data["nodes"]] == [alpha.node_id]
    assert data["nodes"][0].keys() == direct["nodes"][0].keys()
    assert data["catalogue"] == direct["catalogue"]
    assert [e["id"] for e in data["catalogue"]] == ["e2e/other", "e2e/small"]


async def test_models_list_add_remove(agents: Fleet) -> None:
    alpha = await agents.start("alpha", catalogue_toml=CATALOGUE_TOML)
    assert alpha.catalogue is not None
    listed = await helexa("models", "list", agent=alpha)
    assert listed.rc == 0, listed.err
    row = next(line for line in listed.out.splitlines() if line.startswith("e2e/small "))
    assert row.split() == ["e2e/small", "fake", "0.1G", "-", "alpha", "small", "-"]

    added = await helexa(
        "models", "add", "e2e/new", "--engine", "fake", "--memory-mb", "50", "--alias", "newbie", agent=alpha
    )
    assert added.rc == 0, added.err
    assert added.out.strip() == "e2e/new saved (version 1)"
    assert "e2e/new" in await agents.model_ids(alpha)
    text = alpha.catalogue.read_text()
    assert COMMENT in text and "# the id operators type" in text
    assert 'id = "e2e/new"' in text and 'aliases = ["newbie"]' in text
    as_json = json.loads((await helexa("models", "list", "--json", agent=alpha)).out)
    new = next(e for e in as_json if e["id"] == "e2e/new")
    assert new["aliases"] == ["newbie"] and new["feasible_on"] == ["alpha"]

    removed = await helexa("models", "remove", "e2e/new", agent=alpha)
    assert removed.rc == 0, removed.err
    assert removed.out.strip() == "e2e/new removed from the catalogue"
    assert "e2e/new" not in await agents.model_ids(alpha)
    text = alpha.catalogue.read_text()
    assert "e2e/new" not in text and COMMENT in text and 'id = "e2e/small"' in text

    again = await helexa("models", "remove", "e2e/new", agent=alpha)
    assert again.rc == 1 and "e2e/new" in one_line(again.err) and "model_not_found" in again.err


async def test_load_chat_unload(agents: Fleet) -> None:
    alpha = await agents.start("alpha", catalogue_toml=CATALOGUE_TOML)
    loaded = await helexa("load", "small", "--node", "alpha", agent=alpha)
    assert loaded.rc == 0, loaded.err
    assert loaded.out.strip() == "e2e/small is loaded on alpha"
    assert await agents.model_status(alpha, "e2e/small", "alpha") == "loaded"
    status = await helexa("status", agent=alpha)
    model_line = next(line for line in status.out.splitlines() if line.startswith("e2e/small "))
    assert model_line.split()[:3] == ["e2e/small", "alpha", "loaded"]

    again = await helexa("load", "e2e/small", agent=alpha)  # the mesh decides: already there
    assert again.rc == 0 and again.out.strip() == "e2e/small is already loaded on alpha"

    # chat streams: the first words are on stdout while the reply is still being generated.
    proc = await asyncio.create_subprocess_exec(
        HELEXA, "chat", "small", "say", "hi", "--agent", alpha.url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env(),
    )  # fmt: skip
    assert proc.stdout is not None
    first = await asyncio.wait_for(proc.stdout.read(5), timeout=30)
    assert first == b"hello"
    assert proc.returncode is None  # " world again" is still to come (0.3 s per token)
    rest, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert (first + rest).decode() == "hello world again\n"

    unloaded = await helexa("unload", "small", agent=alpha)
    assert unloaded.rc == 0, unloaded.err
    assert unloaded.out.strip() == "e2e/small unloaded from alpha"
    assert await agents.model_status(alpha, "e2e/small", "alpha") is None


async def test_errors_and_key(agents: Fleet) -> None:
    alpha = await agents.start("alpha", catalogue_toml=CATALOGUE_TOML)
    for argv in (("load", "nope"), ("unload", "nope"), ("chat", "nope", "hi")):
        r = await helexa(*argv, agent=alpha)
        assert r.rc == 1, (argv, r)
        line = one_line(r.err)
        assert line.startswith("helexa: error: ") and "'nope'" in line and "model_not_found" in line, line
        assert r.out.strip() == ""
    r = await helexa("load", "small", "--node", "ghost", agent=alpha)
    assert r.rc == 1 and "no live node named 'ghost'" in one_line(r.err)
    assert await agents.model_status(alpha, "e2e/small", "alpha") is None

    down = f"http://127.0.0.1:{free_port()}"
    for down_argv in (["status"], ["load", "small"], ["models", "list"]):
        r = await helexa(*down_argv, agent=down)
        assert r.rc == 3, (down_argv, r)
        assert one_line(r.err) == f"helexa: cannot reach the agent at {down}: " + (
            "connection refused (is `helexa agent` running there?)"
        )

    keys = [await helexa("key") for _ in range(2)]
    assert all(k.rc == 0 and re.fullmatch(r"[A-Za-z0-9_-]{43}\n", k.out) for k in keys)
    assert keys[0].out != keys[1].out


async def test_three_agents_load_and_unload_on_a_named_node(agents: Fleet) -> None:
    alpha = await agents.start("alpha", catalogue_toml=CATALOGUE_TOML)
    beta = await agents.start("beta", peers=[alpha], entries=[])
    gamma = await agents.start("gamma", peers=[alpha], entries=[])
    await eventually(lambda: alpha.sees(beta, gamma) and beta.sees(gamma) and gamma.sees(beta), what="mesh")
    status = await helexa("status", agent=beta)
    assert status.rc == 0, status.err
    names = [line.split()[0] for line in status.out.splitlines() if line.split()[2:3] == ["alive"]]
    assert names == ["alpha", "beta", "gamma"]

    # Asked of beta, for gamma: beta forwards the load to gamma.
    loaded = await helexa("load", "small", "--node", "gamma", agent=beta)
    assert loaded.rc == 0, loaded.err
    assert "gamma" in loaded.out
    assert await agents.model_status(gamma, "e2e/small", "gamma") == "loaded"
    assert gamma.engine.loads[SMALL] == 1 and alpha.engine.loads[SMALL] == 0

    chat = await helexa("chat", "small", "hi", agent=alpha)  # alpha forwards to gamma
    assert chat.rc == 0 and chat.out == "hello world again\n", chat.err

    unloaded = await helexa("unload", "e2e/small", agent=alpha)
    assert unloaded.rc == 0, unloaded.err
    assert unloaded.out.strip() == "e2e/small unloaded from gamma"
    assert await agents.model_status(gamma, "e2e/small", "gamma") is None


async def test_keyed_mesh_needs_the_key_for_changes(agents: Fleet) -> None:
    key = "e2e-mesh-key-0123456789abcdef"
    alpha = await agents.start("alpha", catalogue_toml=CATALOGUE_TOML, args=["--mesh-key", key])
    status = await helexa("status", agent=alpha)  # reads stay open
    assert status.rc == 0 and "closed (keyed)" in status.out and "OPEN" not in status.out

    refused = await helexa("load", "small", agent=alpha)
    assert refused.rc == 1
    line = one_line(refused.err)
    assert "HTTP 401" in line and "no mesh key: pass --mesh-key or set HELEXA_MESH_KEY" in line, line
    wrong = await helexa("models", "remove", "e2e/other", "--mesh-key", "not-the-key", agent=alpha)
    assert wrong.rc == 1 and "a wrong mesh key" in one_line(wrong.err)
    assert await agents.model_status(alpha, SMALL, "alpha") is None
    assert "e2e/other" in await agents.model_ids(alpha)

    loaded = await helexa("load", "small", agent=alpha, env={"HELEXA_MESH_KEY": key})
    assert loaded.rc == 0 and loaded.out.strip() == "e2e/small is loaded on alpha", loaded.err
    removed = await helexa("models", "remove", "e2e/other", "--mesh-key", key, agent=alpha)
    assert removed.rc == 0, removed.err
    assert "e2e/other" not in await agents.model_ids(alpha)
    chat = await helexa("chat", "small", "hi", agent=alpha)  # /v1 needs no mesh key (no API keys set)
    assert chat.rc == 0 and chat.out == "hello world again\n", chat.err
