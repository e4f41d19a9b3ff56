"""The sampling fields the OpenAI API (and vLLM's extensions) send reach the engine; bad ones are 400s
naming the field."""

from __future__ import annotations

import openai
import pytest

from .conftest import Edge

MODEL = "test/tiny-chat"
HI = [{"role": "user", "content": "x"}]


async def test_penalties_bias_and_extensions_reach_the_engine(edge: Edge) -> None:
    model = edge.cortex.slots[MODEL].loaded
    await edge.client.chat.completions.create(
        model=MODEL,
        messages=HI,  # type: ignore[arg-type]
        presence_penalty=0.5,
        frequency_penalty=-1.5,
        logit_bias={"17": 100, "4": -100},
        extra_body={"min_p": 0.1, "repetition_penalty": 1.3, "stop_token_ids": [7, 9], "ignore_eos": True},
    )
    s = model.requests[-1].sampling
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty, s.min_p) == (0.5, -1.5, 1.3, 0.1)
    assert s.logit_bias == ((17, 100.0), (4, -100.0))
    assert s.stop_token_ids == (7, 9) and s.ignore_eos is True

    await edge.client.completions.create(model=MODEL, prompt="x", max_tokens=2, frequency_penalty=2.0)
    s = model.requests[-1].sampling
    assert s.frequency_penalty == 2.0 and s.presence_penalty == 0.0 and s.logit_bias == ()


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"logit_bias": {"5": "high"}}, "logit_bias.5"),
        ({"logit_bias": [1, 2]}, "logit_bias"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"stop_token_ids": [1, -2]}, "stop_token_ids[1]"),
        ({"stop_token_ids": "7"}, "stop_token_ids"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
async def test_bad_sampling_fields_are_400s_naming_the_field(
    edge: Edge, extra: dict[str, object], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await edge.client.chat.completions.create(
            model=MODEL,
            messages=HI,  # type: ignore[arg-type]
            extra_body=extra,
        )
    assert info.value.status_code == 400
    body = info.value.body
    assert isinstance(body, dict) and body.get("param") == param, body
