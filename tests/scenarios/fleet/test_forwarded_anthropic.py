"""The Anthropic Messages API through an entry agent that cannot hold the model: routed, cold-loaded on
the peer and forwarded (streamed and not, tools, count_tokens), the client's `x-api-key` checked at the
entry and never sent on, and the peer's errors in Anthropic's envelope."""

from __future__ import annotations

import anthropic
import pytest

from tests.helpers.agents import Fleet, entry
from tests.helpers.polling import eventually

MARKUP = ["Sure.", "<tool_call>\n", '{"name": "get_time", "arguments": {"zone": "CET"}}', "\n</tool_call>"]
KEY = "client-key"


async def test_messages_through_a_second_agent(fleet: Fleet) -> None:
    entries = [entry("org/tools", options={"tokens": MARKUP, "context_length": 64})]
    b = await fleet.start("b", entries=entries, args=["--api-key", KEY])
    a = await fleet.start("a", entries=entries, args=["--api-key", KEY], memory_mb=10, peers=[b])
    await eventually(lambda: a.sees(b) and b.sees(a), what="a and b to see each other")
    client = anthropic.AsyncAnthropic(base_url=a.url, api_key=KEY, max_retries=0)
    tools: list[anthropic.types.ToolParam] = [{"name": "get_time", "input_schema": {"type": "object"}}]
    async with client:
        message = await client.messages.create(
            model="org/tools", max_tokens=100, messages=[{"role": "user", "content": "time?"}], tools=tools
        )
        assert message.stop_reason == "tool_use"
        assert [b.type for b in message.content] == ["text", "tool_use"]
        assert message.content[1].input == {"zone": "CET"}  # type: ignore[union-attr]
        async with client.messages.stream(
            model="org/tools", max_tokens=100, messages=[{"role": "user", "content": "time?"}]
        ) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        assert text == "".join(MARKUP) and final.stop_reason == "end_turn"
        counted = await client.messages.count_tokens(
            model="org/tools", messages=[{"role": "user", "content": "what time is it"}]
        )
        assert counted.input_tokens == 4
        # The peer refuses a prompt longer than the model's context: its 400, in Anthropic's envelope.
        with pytest.raises(anthropic.BadRequestError) as refused:
            await client.messages.create(
                model="org/tools", max_tokens=10, messages=[{"role": "user", "content": "word " * 100}]
            )
        assert isinstance(refused.value.body, dict) and refused.value.body["type"] == "error"
        wrong = anthropic.AsyncAnthropic(base_url=a.url, api_key="wrong", max_retries=0)
        async with wrong:
            with pytest.raises(anthropic.AuthenticationError):
                await wrong.messages.create(
                    model="org/tools", max_tokens=10, messages=[{"role": "user", "content": "time?"}]
                )
    assert a.loads("org/tools") == 0 and b.loads("org/tools") == 1
    assert a.engine.requests_total == 0 and b.engine.requests_total == 2  # served on b only
