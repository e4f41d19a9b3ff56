"""`POST /v1/embeddings` through the assembled agent app (a real aiohttp server on port 0) with the real
transformers embedding engine on a tiny encoder, via the openai SDK (strict): strings, lists, token ids,
`float` and the SDK's default base64, `dimensions`, usage, the errors naming their field, and chat and
embedding models refusing each other's routes."""

from __future__ import annotations

import math
from pathlib import Path

import anthropic
import openai
import pytest
from pytest_aiohttp import AiohttpServer

from helexa.catalogue.entry import ModelEntry
from helexa.engine.base import ModelId
from helexa.engine.fake import FakeEngine
from helexa.engine.testing import build_tiny_encoder
from helexa.mesh.assembly import build_app, default_engine_factory
from helexa.mesh.config import load_config
from tests.helpers.agents import FAST, entry


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_encoder(
        tmp_path_factory.mktemp("encoder"), context_length=64, matryoshka_dimensions=(8, 16)
    )


async def _start(aiohttp_server: AiohttpServer, tmp_path: Path, encoder_dir: Path) -> str:
    argv = ["--state-dir", str(tmp_path / "state"), "--name", "t1", "--no-mdns"]
    config = load_config(argv, {"HOME": str(tmp_path)})
    entries = [
        ModelEntry(
            id=ModelId("org/enc"),
            source=str(encoder_dir),
            engine="transformers",
            task="embed",
            memory_mb=100,
            aliases=("enc",),
        ),
        entry("org/chat"),
    ]
    engine_for = default_engine_factory({"fake": FakeEngine()})
    app = await build_app(config, engine_for=engine_for, catalogue=entries, neuron_timing=FAST)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}"


def _norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


async def test_embeddings_through_the_sdk(
    aiohttp_server: AiohttpServer, tmp_path: Path, encoder_dir: Path
) -> None:
    base = await _start(aiohttp_server, tmp_path, encoder_dir)
    # The SDK validates a response before it decodes base64, and its type says floats: strict validation
    # refuses the SDK's own default format (OpenAI's answers too), so that one call goes unvalidated.
    lenient = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none")
    async with lenient:
        one = await lenient.embeddings.create(model="enc", input="Hello world")  # SDK default: base64
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", _strict_response_validation=True)
    async with client:
        assert one.model == "org/enc" and one.object == "list" and len(one.data) == 1
        vector = one.data[0].embedding
        assert len(vector) == 32 and abs(_norm(vector) - 1.0) < 1e-4
        assert one.usage.prompt_tokens == one.usage.total_tokens > 2

        floats = await client.embeddings.create(
            model="org/enc", input=["Hello world", "Readability counts."], encoding_format="float"
        )
        default = await client.embeddings.create(model="enc", input="x", encoding_format="float")
        assert len(default.data[0].embedding) == 32
        assert [d.index for d in floats.data] == [0, 1]
        assert max(abs(a - b) for a, b in zip(floats.data[0].embedding, vector, strict=True)) < 1e-5

        ids = [5, 6, 7, 8]
        by_ids = await client.embeddings.create(model="enc", input=ids, encoding_format="float")
        assert len(by_ids.data) == 1 and by_ids.usage.prompt_tokens == len(ids) + 2  # [CLS] ... [SEP]
        lists = await client.embeddings.create(model="enc", input=[ids, [9, 10]], encoding_format="float")
        assert len(lists.data) == 2
        assert (
            max(abs(a - b) for a, b in zip(lists.data[0].embedding, by_ids.data[0].embedding, strict=True))
            < 1e-5
        )

        short = await client.embeddings.create(
            model="enc", input="Hello world", dimensions=8, encoding_format="float"
        )
        assert len(short.data[0].embedding) == 8 and abs(_norm(short.data[0].embedding) - 1.0) < 1e-4

        for kwargs, param in (
            ({"input": "x", "dimensions": 64}, "dimensions"),
            ({"input": []}, "input"),
            ({"input": ["ok", 3]}, "input[1]"),
            ({"input": "word " * 100}, "input"),
            ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
        ):
            with pytest.raises(openai.BadRequestError) as info:
                await client.embeddings.create(model="enc", **kwargs)
            assert info.value.status_code == 400 and info.value.param == param, (kwargs, info.value)

        with pytest.raises(openai.BadRequestError) as chat_model:
            await client.embeddings.create(model="org/chat", input="hi")
        assert chat_model.value.param == "model" and "not an embedding model" in chat_model.value.message
        with pytest.raises(openai.BadRequestError) as embed_model:
            await client.chat.completions.create(model="enc", messages=[{"role": "user", "content": "hi"}])
        assert embed_model.value.param == "model" and "embedding model" in embed_model.value.message
        with pytest.raises(openai.BadRequestError) as via_responses:
            await client.responses.create(model="enc", input="hi")
        assert via_responses.value.param == "model" and "embedding model" in via_responses.value.message
        with pytest.raises(openai.NotFoundError):
            await client.embeddings.create(model="org/missing", input="hi")
    async with anthropic.AsyncAnthropic(base_url=base, api_key="none") as claude:
        with pytest.raises(anthropic.BadRequestError) as via_messages:
            await claude.messages.create(
                model="enc", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
            )
        assert "embedding model" in via_messages.value.message
