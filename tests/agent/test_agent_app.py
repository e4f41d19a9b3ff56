"""The assembled agent app (real aiohttp server on port 0) with the fake engine, via the openai SDK."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import pytest
from aiohttp import ClientSession, web
from pytest_aiohttp import AiohttpServer

from helexa.engine.base import ModelId
from helexa.engine.fake import FakeEngine
from helexa.mesh.assembly import build_app
from helexa.mesh.config import load_config
from helexa.mesh.server.appkeys import AGENT
from tests.helpers.agents import FAST, entry


@pytest.fixture
def fake() -> FakeEngine:
    return FakeEngine()


async def _start(
    aiohttp_server: AiohttpServer, tmp_path: Path, fake: FakeEngine, entries: list
) -> tuple[str, web.Application]:
    argv = ["--state-dir", str(tmp_path / "state"), "--name", "t1", "--no-mdns"]  # hermetic: no multicast
    config = load_config(argv, {"HOME": str(tmp_path)})
    app = await build_app(config, engine_for=lambda e, d: fake, catalogue=entries, neuron_timing=FAST)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}", app


async def test_chat_models_and_health_through_the_sdk(aiohttp_server, tmp_path, fake) -> None:
    entries = [
        entry(
            "org/chatty", options={"tokens": ["Hello", " there"], "load_delay_s": 0.05}, aliases=("chatty",)
        ),
        entry("org/too-big", memory_mb=10**9),
    ]
    base, app = await _start(aiohttp_server, tmp_path, fake, entries)
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", _strict_response_validation=True)
    async with client:
        models = await client.models.list()
        ids = [m.id for m in models.data]
        assert ids == ["org/chatty"]  # the infeasible one is not listed
        row = models.data[0].model_dump()
        assert row["status"] == "unloaded" and row["feasible_on"] == ["t1"]

        reply = await client.chat.completions.create(
            model="chatty", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content == "Hello there"

        answers = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model="org/chatty", messages=[{"role": "user", "content": "x"}]
                )
                for _ in range(5)
            )
        )
        assert all(a.choices[0].message.content == "Hello there" for a in answers)

        stream = await client.chat.completions.create(
            model="org/chatty", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "Hello there"

        loaded = (await client.models.retrieve("org/chatty")).model_dump()
        assert loaded["status"] == "loaded" and loaded["loaded"] is True
        assert [(loc["node"], loc["status"]) for loc in loaded["locations"]] == [("t1", "loaded")]

        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert fake.loads[ModelId("org/chatty")] == 1

    async with ClientSession() as http:
        async with http.get(f"{base}/healthz") as r:
            assert r.status == 200
            body = await r.json()
            assert body["status"] == "ok" and body["node"] == "t1" and body["models_loaded"] == 1
        async with http.get(f"{base}/metrics") as r:
            text = await r.text()
            assert 'helexa_model_loads_total{model="org/chatty",result="ok"} 1.0' in text

    # This node's record shows the loaded model (what gossip and /mesh/state will carry).
    await asyncio.sleep(0)
    record = app[AGENT].fleet.self_record
    assert record.model("org/chatty") is not None
    assert record.version > 1


async def test_twenty_simultaneous_first_requests_one_load(aiohttp_server, tmp_path, fake) -> None:
    entries = [entry("m", options={"tokens": ["ok"], "load_delay_s": 0.2})]
    base, _ = await _start(aiohttp_server, tmp_path, fake, entries)
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", _strict_response_validation=True)
    async with client:
        answers = await asyncio.gather(
            *(
                client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
                for _ in range(20)
            )
        )
    assert [a.choices[0].message.content for a in answers] == ["ok"] * 20
    assert fake.load_attempts[ModelId("m")] == 1


async def test_infeasible_model_is_503_with_reason(aiohttp_server, tmp_path, fake) -> None:
    base, _ = await _start(aiohttp_server, tmp_path, fake, [entry("huge", memory_mb=10**9)])
    async with (
        ClientSession() as http,
        http.post(
            f"{base}/v1/chat/completions",
            json={"model": "huge", "messages": [{"role": "user", "content": "x"}]},
        ) as r,
    ):
        assert r.status == 503
        body = await r.json()
        assert "huge" in body["error"]["message"]
        assert "cannot run" in body["error"]["message"]
