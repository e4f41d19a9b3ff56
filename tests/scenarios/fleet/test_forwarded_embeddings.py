"""`/v1/embeddings` through an entry agent to the agent that serves the embedding model (forwarded as raw
bytes, served by the peer's `/mesh/peer/v1/embeddings`), with the same answer and errors as locally."""

from __future__ import annotations

import openai
import pytest

from tests.helpers.agents import Fleet, entry

EMBED: dict[str, object] = {"embedding_dimensions": 16, "matryoshka": True}


async def test_embeddings_through_a_second_agent(fleet: Fleet) -> None:
    entries = [entry("org/emb", task="embed", options=EMBED), entry("org/chat")]
    a, b = await fleet.serving_pair(entries, "org/emb")
    client = openai.AsyncOpenAI(base_url=f"{a.url}/v1", api_key="none", _strict_response_validation=True)
    async with client:
        reply = await client.embeddings.create(
            model="org/emb", input=["one two", "three"], encoding_format="float"
        )
        assert [len(d.embedding) for d in reply.data] == [16, 16]
        assert reply.usage.prompt_tokens == reply.usage.total_tokens == 3
        short = await client.embeddings.create(
            model="org/emb", input=[1, 2, 3], dimensions=4, encoding_format="float"
        )
        assert len(short.data[0].embedding) == 4 and short.usage.prompt_tokens == 3
        with pytest.raises(openai.BadRequestError) as info:
            await client.embeddings.create(model="org/emb", input="x", dimensions=99, encoding_format="float")
        assert info.value.param == "dimensions"  # the serving agent's refusal, passed through
        with pytest.raises(openai.BadRequestError) as chat:
            await client.embeddings.create(model="org/chat", input="x", encoding_format="float")
        assert chat.value.param == "model"
    assert a.engine.requests_total == 0 and b.engine.requests_total == 2  # served on b only
    assert a.loads("org/emb") == 0
