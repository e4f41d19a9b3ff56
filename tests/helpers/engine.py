"""Request builders and stream collectors the engine tests share (every engine, one contract)."""

from __future__ import annotations

from helexa.engine.base import (
    ChatMessage,
    Delta,
    Final,
    GenerationRequest,
    LoadedModel,
    RequestId,
    SamplingParams,
)


def user_request(text: str = "hi there", rid: str = "r", **sampling: object) -> GenerationRequest:
    """A chat request of one user turn, with `sampling` as `SamplingParams` fields."""
    return GenerationRequest(
        request_id=RequestId(rid),
        messages=(ChatMessage(role="user", content=text),),
        sampling=SamplingParams(**sampling),  # type: ignore[arg-type]
    )


async def collect_deltas(model: LoadedModel, request: GenerationRequest) -> tuple[list[str], Final]:
    """One whole generation: its deltas' texts and its `Final`, checking the stream contract on the way
    (deltas are never empty, exactly one `Final` comes, and it comes last)."""
    deltas: list[str] = []
    final: Final | None = None
    async for event in model.generate(request):
        assert final is None, "nothing may follow Final"
        if isinstance(event, Delta):
            assert event.text, "deltas are never empty"
            deltas.append(event.text)
        else:
            final = event
    assert final is not None
    return deltas, final


async def collect(model: LoadedModel, request: GenerationRequest) -> tuple[str, Final]:
    """One whole generation: its text and its `Final` (see `collect_deltas`)."""
    deltas, final = await collect_deltas(model, request)
    return "".join(deltas), final
