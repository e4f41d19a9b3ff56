"""What the engines do alike between a `GenerationRequest` arriving and its last event leaving.

- Request checks every engine makes before any delta: `check_usable` (a failed or unloaded model),
  `check_input` (exactly one of prompt and messages), `validate_sampling`, `check_context`; and
  `completion_budget`, how many tokens a completion may have.
- `InFlight`: the generations running under each request id, so that `abort(request_id)` and
  `unload()` can reach them.
- `EventChannel`: the queue that carries one generation's events from its producer (an inference
  thread, a worker's reader task) to the `generate` that yields them, and tells that `generate`'s
  cleanup whether the generation ended by itself or was abandoned and must be stopped.
"""

from __future__ import annotations

import asyncio
import math
from typing import Generic, Literal, TypeVar

from .base import Final, GenerationEvent, GenerationRequest, ModelId, RequestId, SamplingParams
from .errors import ContextLengthExceeded, EngineError, EngineFault, RequestError

H = TypeVar("H")

InputParam = Literal["prompt", "messages"]


def check_usable(model_id: ModelId, *, fault: str | None, unloaded: bool) -> None:
    """Refuse a request to a model that faulted (`EngineFault`) or is unloaded (`EngineError`)."""
    if fault is not None:
        raise EngineFault(f"model {model_id} is failed: {fault}")
    if unloaded:
        raise EngineError(f"model {model_id} is unloaded")


def check_input(request: GenerationRequest) -> InputParam:
    """The field that carries the request's input, checking that exactly one of them does."""
    has_prompt = request.prompt is not None or request.prompt_ids is not None
    if has_prompt == (request.messages is not None):
        raise RequestError("exactly one of prompt and messages is required", param="messages")
    return "prompt" if has_prompt else "messages"


def validate_sampling(s: SamplingParams) -> None:
    """Refuse sampling parameters no engine can honour (the HTTP edge checks narrower ranges)."""
    if not (s.temperature >= 0 and math.isfinite(s.temperature)):
        raise RequestError("temperature must be a finite number >= 0", param="temperature")
    if not (0 < s.top_p <= 1):
        raise RequestError("top_p must be in (0, 1]", param="top_p")
    if s.top_k < 0:
        raise RequestError("top_k must be >= 0", param="top_k")
    if s.max_tokens is not None and s.max_tokens < 1:
        raise RequestError("max_tokens must be >= 1", param="max_tokens")
    if not (0 <= s.min_p <= 1):
        raise RequestError("min_p must be in [0, 1]", param="min_p")
    if not (s.repetition_penalty > 0 and math.isfinite(s.repetition_penalty)):
        raise RequestError("repetition_penalty must be a finite number > 0", param="repetition_penalty")
    for name in ("presence_penalty", "frequency_penalty"):
        if not math.isfinite(getattr(s, name)):
            raise RequestError(f"{name} must be a finite number", param=name)


def check_context(*, n_prompt: int, max_tokens: int | None, context_length: int, param: InputParam) -> None:
    """Refuse a prompt that leaves no room for a completion, or a `max_tokens` past the context."""
    if n_prompt >= context_length:
        raise ContextLengthExceeded(
            f"this model's maximum context length is {context_length} tokens; the prompt has {n_prompt}",
            param=param,
        )
    if max_tokens is not None and n_prompt + max_tokens > context_length:
        raise ContextLengthExceeded(
            f"this model's maximum context length is {context_length} tokens; you requested "
            f"{n_prompt + max_tokens} ({n_prompt} in the prompt, {max_tokens} for the completion)",
            param="max_tokens",
        )


def completion_budget(*, n_prompt: int, max_tokens: int | None, context_length: int) -> int:
    """How many tokens the completion may have: `max_tokens`, or until the context is full."""
    room = context_length - n_prompt
    return room if max_tokens is None else min(max_tokens, room)


class InFlight(Generic[H]):
    """The handles (jobs, worker stream ids) of the generations running under each request id.

    One request id may be running more than once at a time; `abort` reaches all of them. The lists
    returned are copies, safe to iterate while generations end.
    """

    __slots__ = ("_by_request",)

    def __init__(self) -> None:
        self._by_request: dict[RequestId, set[H]] = {}

    def add(self, request_id: RequestId, handle: H) -> None:
        self._by_request.setdefault(request_id, set()).add(handle)

    def discard(self, request_id: RequestId, handle: H) -> None:
        handles = self._by_request.get(request_id)
        if handles is not None:
            handles.discard(handle)
            if not handles:
                del self._by_request[request_id]

    def __len__(self) -> int:
        """How many request ids have generations running."""
        return len(self._by_request)

    def of(self, request_id: RequestId) -> list[H]:
        return list(self._by_request.get(request_id, ()))

    def all(self) -> list[H]:
        return [handle for handles in self._by_request.values() for handle in handles]


class EventChannel:
    """One generation's events, from its producer to the consumer that yields them.

    The producer `put`s `Delta`s, then a `Final` or the exception that ends the generation (from
    another thread: through `loop.call_soon_threadsafe`). Iterating the channel yields the events up to
    and including the `Final` and raises the exception. Once either has been handed over, `finished`
    is true; a consumer that stops iterating before that (its client went away) must stop the
    producer.

    A plain async iterator rather than an async generator, so a consumer that is closed mid-stream
    leaves no suspended generator behind.
    """

    __slots__ = ("_queue", "finished")

    def __init__(self) -> None:
        self._queue: asyncio.Queue[GenerationEvent | BaseException] = asyncio.Queue()
        self.finished = False

    def put(self, item: GenerationEvent | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> EventChannel:
        return self

    async def __anext__(self) -> GenerationEvent:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if isinstance(item, Final):
            self.finished = True
        return item
