"""Every operator command against a real (fake) agent on port 0; the CLI runs in a thread with its own
event loop, as it does from a shell."""

from __future__ import annotations

import asyncio
import io
import json

import pytest

from helexa.mesh.cli import ops
from helexa.mesh.client import AgentClient
from tests.helpers.fake_agent import CALLS, STATE, make_agent
from tests.helpers.ports import free_port


@pytest.fixture
async def agent(aiohttp_server):
    server = await aiohttp_server(make_agent())
    return server


def url(server) -> str:
    return f"http://127.0.0.1:{server.port}"


async def run(*argv: str) -> int:
    return await asyncio.to_thread(ops.main, list(argv))


async def test_status_table(agent, capsys) -> None:
    assert await run("status", "--agent", url(agent)) == 0
    out = capsys.readouterr().out
    assert "OPEN" in out and "beast" in out and "10.0.0.5:31313" in out and "dead" in out
    assert "loading 40%" in out and "helexa/demo" in out and "85.0" in out


async def test_status_json_shape(agent, capsys) -> None:
    assert await run("status", "--json", "--agent", url(agent)) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == STATE
    assert {"mesh", "open", "nodes", "catalogue"} <= data.keys()


async def test_agent_from_environment(agent, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HELEXA_AGENT", f"127.0.0.1:{agent.port}")
    assert await run("status", "--json") == 0
    assert json.loads(capsys.readouterr().out)["mesh"] == "default"


async def test_models_list(agent, capsys) -> None:
    assert await run("models", "list", "--agent", url(agent)) == 0
    out = capsys.readouterr().out
    assert "helexa/demo" in out and "node-a" in out and "beast, laptop" in out and "demo" in out
    assert await run("models", "list", "--json", "--agent", url(agent)) == 0
    assert json.loads(capsys.readouterr().out)[0]["id"] == "helexa/demo"


async def test_models_add_and_remove(agent, capsys) -> None:
    argv = ["models", "add", "Qwen/Qwen2.5-7B", "--source", "Qwen/Qwen2.5-7B", "--memory-mb", "16000"]
    assert (
        await run(*argv, "--alias", "qwen", "--pinned-on", "beast", "--resident", "--agent", url(agent)) == 0
    )
    assert "saved Qwen/Qwen2.5-7B" in capsys.readouterr().out
    op, entry = agent.app[CALLS][-1]
    assert op == "put"
    assert entry == {
        "id": "Qwen/Qwen2.5-7B",
        "source": "Qwen/Qwen2.5-7B",
        "engine": "auto",
        "memory_mb": 16000,
        "aliases": ["qwen"],
        "pinned_on": ["beast"],
        "resident": True,
    }
    assert await run("models", "remove", "helexa/demo", "--agent", url(agent)) == 0
    assert agent.app[CALLS][-1] == ("delete", "helexa/demo")  # the slash survives the URL
    assert await run("models", "remove", "nope/x", "--agent", url(agent)) == ops.EXIT_AGENT_ERROR
    err = capsys.readouterr().err.strip()
    assert err == "helexa: error: model 'nope/x' is not in the catalogue (model_not_found, HTTP 404)"


async def test_load_and_unload(agent, capsys) -> None:
    assert await run("load", "helexa/demo", "--node", "laptop", "--agent", url(agent)) == 0
    assert agent.app[CALLS][-1] == ("load", {"model": "helexa/demo", "node": "laptop"})
    assert "loading on laptop" in capsys.readouterr().out
    assert await run("unload", "helexa/demo", "--agent", url(agent)) == 0
    assert agent.app[CALLS][-1] == ("unload", {"model": "helexa/demo", "node": None})
    assert await run("load", "missing", "--agent", url(agent)) == ops.EXIT_AGENT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model_not_found" in err


async def test_connection_refused_is_one_clear_line(capsys) -> None:
    port = free_port()
    assert await run("status", "--agent", f"http://127.0.0.1:{port}") == ops.EXIT_UNREACHABLE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "connection refused" in err and str(port) in err


def test_key_is_random_and_urlsafe(capsys) -> None:
    assert ops.main(["key"]) == 0
    assert ops.main(["key"]) == 0
    a, b = capsys.readouterr().out.split()
    assert a != b and len(a) >= 32 and all(c.isalnum() or c in "-_" for c in a)


def test_usage_errors_exit_2(capsys) -> None:
    assert ops.main(["load"]) == ops.EXIT_USAGE
    assert ops.main(["models", "frobnicate"]) == ops.EXIT_USAGE


async def test_chat_one_prompt(agent, capsys) -> None:
    assert await run("chat", "helexa/demo", "say", "hi", "--agent", url(agent)) == 0
    assert capsys.readouterr().out == "Hello turn 1\n"
    _, body = agent.app[CALLS][-1]
    assert body["stream"] is True and body["messages"] == [{"role": "user", "content": "say hi"}]


async def test_chat_repl_keeps_history(agent, capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("first\nsecond\n\n"))
    assert await run("chat", "helexa/demo", "--agent", url(agent)) == 0
    out = capsys.readouterr().out
    assert "Hello turn 1" in out and "Hello turn 2" in out
    _, body = agent.app[CALLS][-1]
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]


async def test_chat_error_mid_stream(agent, capsys) -> None:
    assert await run("chat", "broken", "hi", "--agent", url(agent)) == ops.EXIT_AGENT_ERROR
    assert "device fault" in capsys.readouterr().err


async def test_client_follows_events(agent) -> None:
    async with AgentClient(url(agent)) as client:
        events = [e async for e in client.events()]
    assert events == [
        {"type": "join", "ts": 1.0, "node": "beast"},
        {"type": "evict", "ts": 2.0, "node": "beast", "model": "x"},
    ]


async def test_client_set_pinned_writes_entry_without_derived_fields(agent) -> None:
    async with AgentClient(url(agent)) as client:
        await client.set_pinned("demo", ["beast"])
    op, entry = agent.app[CALLS][-1]
    assert op == "put" and entry["pinned_on"] == ["beast"] and entry["id"] == "helexa/demo"
    assert not {"feasible_on", "locations", "version"} & entry.keys()
