"""End to end: the real agent app, the real default catalogue, the shipped demo model, the openai SDK."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from helexa.catalogue.validate import builtin_path
from helexa.engine.testing import build_tiny_model
from helexa.mesh.assembly import build_app
from helexa.mesh.config import load_config
from helexa.mesh.server.appkeys import AGENT


@pytest.mark.slow
async def test_chat_with_the_demo_model_through_the_default_catalogue(aiohttp_server, tmp_path: Path) -> None:
    assert (builtin_path("demo") / "config.json").is_file(), (
        "the demo model is not installed in catalogue/demo"
    )
    config = load_config(
        ["--state-dir", str(tmp_path / "state"), "--name", "demo-node", "--no-mdns"], {"HOME": str(tmp_path)}
    )
    app = await build_app(config)  # real catalogue (created from the packaged default), real engine
    server = await aiohttp_server(app)
    assert (tmp_path / "state" / "models.toml").is_file()
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none", _strict_response_validation=True
    )
    async with client:
        listed = {m.id: m.model_dump() for m in (await client.models.list()).data}
        assert "helexa/demo" in listed
        assert listed["helexa/demo"]["status"] == "unloaded"
        assert listed["helexa/demo"]["feasible_on"] == ["demo-node"]

        reply = await client.chat.completions.create(
            model="helexa/demo",
            messages=[{"role": "user", "content": "Tell me about the sea."}],
            max_tokens=24,
            temperature=0.7,
            seed=7,
        )
        text = reply.choices[0].message.content or ""
        assert text.strip(), "the demo model answered nothing"
        assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 24
        assert reply.choices[0].finish_reason in ("stop", "length")

        stream = await client.chat.completions.create(
            model="helexa/demo",
            messages=[{"role": "user", "content": "Tell me about the sea."}],
            max_tokens=24,
            temperature=0.7,
            seed=7,
            stream=True,
        )
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert streamed == text  # same seed, same output, streamed or not

        loaded = (await client.models.retrieve("helexa/demo")).model_dump()
        assert loaded["status"] == "loaded"
        assert loaded["locations"][0]["memory_mb"] > 0
    record = app[AGENT].neuron.record("helexa/demo")
    assert record is not None and record.engine == "transformers" and record.devices == ("cpu",)


@pytest.mark.slow
async def test_real_engine_with_a_tiny_model_from_a_catalogue_file(aiohttp_server, tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    build_tiny_model(etc / "models" / "tiny")
    # A relative source resolves against the catalogue file's folder; the catalogue path against the
    # config file's folder.
    (etc / "models.toml").write_text(
        '[[models]]\nid = "test/tiny"\nsource = "models/tiny"\nengine = "transformers"\naliases = ["tiny"]\n'
    )
    (etc / "helexa.toml").write_text('catalogue = "models.toml"\nname = "tiny-node"\n')
    config = load_config(
        ["--config", str(etc / "helexa.toml"), "--state-dir", str(tmp_path / "state"), "--no-mdns"],
        {"HOME": str(tmp_path)},
    )
    app = await build_app(config)
    server = await aiohttp_server(app)
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none", _strict_response_validation=True
    )
    async with client:
        assert [m.id for m in (await client.models.list()).data] == ["test/tiny"]
        reply = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8, seed=1
        )
        assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8
    record = app[AGENT].neuron.record("test/tiny")
    assert record is not None and record.status == "loaded" and record.engine == "transformers"
    assert record.memory_mb > 0
