"""The Anthropic Messages API of the HTTP edge: `POST /v1/messages` and `/v1/messages/count_tokens`.

Served exactly as chat is (`mesh.server.inference`): the client's key checked (`x-api-key` or a bearer
token), `cortex.route`, a remote decision handed to the `FORWARDER` (the peer serves it on
`/mesh/peer/v1/messages`), a local one cold-loaded by `decision.acquire()` with keep-alive comments while
it loads, one log line and its metrics per request (`inference.track`). The wire format is
`mesh.server.anthropic_wire`; errors are answered in Anthropic's envelope (`error_middleware` picks it by
route), and a stream that fails after it started ends with an `error` event.

A stream is `message_start`, `ping`, then per content block `content_block_start`, its deltas
(`text_delta`, or one `input_json_delta` with a tool call's whole input) and `content_block_stop`, then
`message_delta` (stop reason and usage: the input tokens are known only at the end, so `message_start`
says 0 and `message_delta` carries both counts) and `message_stop`. Tool calls are parsed out of the text
as it streams (`engine.toolcalls.ToolCallParser`); their markup never shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from aiohttp import web

from helexa.engine.base import Delta, GenerationRequest, LoadedModel, RequestId, ToolCall
from helexa.engine.base import Final as FinalEvent
from helexa.engine.textstream import StopStringMatcher
from helexa.engine.toolcalls import Call, Piece, Text, ToolCallParser
from helexa.mesh import sse
from helexa.mesh.errors import InvalidRequest, ModelFault
from helexa.mesh.routing.decisions import LocalDecision, RemoteDecision
from helexa.mesh.server import anthropic_wire
from helexa.mesh.server.inference import (
    CLIENT_CLOSED_STATUS,
    Choice,
    Merged,
    Outcome,
    StartedFailure,
    Timing,
    fit_to_model,
    forward,
    is_cold,
    open_stream,
    route,
    sampling_for,
    tell_stopped,
    track,
)
from helexa.mesh.server.middleware import authorize_client, json_body_response, to_helexa_error

logger = logging.getLogger(__name__)

__all__ = ["COUNT_TOKENS_PATH", "TokenCounter", "add_anthropic_routes", "count_tokens", "messages"]

COUNT_TOKENS_PATH = anthropic_wire.MESSAGES_PATH + "/count_tokens"


@runtime_checkable
class TokenCounter(Protocol):
    """A loaded model that can say how many tokens a request's prompt is (rendered as it would be)."""

    def count_tokens(self, request: GenerationRequest) -> int: ...


def add_anthropic_routes(app: web.Application) -> None:
    app.router.add_post(anthropic_wire.MESSAGES_PATH, messages)
    app.router.add_post(COUNT_TOKENS_PATH, count_tokens)


async def messages(request: web.Request) -> web.StreamResponse:
    return await track(request, "messages", _serve_messages)


async def count_tokens(request: web.Request) -> web.StreamResponse:
    return await track(request, "messages", _serve_count)


def _generation(parsed: anthropic_wire.MessagesRequest, decision: LocalDecision, request_id: str) -> Choice:
    context = decision.entry.context_length
    sampling = sampling_for(anthropic_wire.capped(parsed.sampling, context), decision.entry.defaults, context)
    return Choice(
        index=0,
        generation=GenerationRequest(
            request_id=RequestId(request_id),
            sampling=sampling,
            messages=parsed.messages,
            tools=parsed.tools,
            tool_choice=parsed.tool_choice,
            parallel_tool_calls=parsed.parallel_tool_calls,
        ),
    )


async def _serve_count(request: web.Request, outcome: Outcome) -> web.StreamResponse:
    authorize_client(request)
    body = await request.read()
    parsed = anthropic_wire.parse_count_tokens_request(body)
    decision = route(request, parsed.model, outcome)
    if isinstance(decision, RemoteDecision):
        return await forward(request, decision, body, outcome)
    choice = _generation(parsed, decision, anthropic_wire.new_message_id())
    async with decision.acquire() as model:
        if not isinstance(model, TokenCounter):
            raise InvalidRequest(
                f"the engine serving '{decision.entry.id}' cannot count tokens", param="model"
            )
        n = await _count(model, choice.generation)
    outcome.prompt_tokens = n
    return json_body_response(anthropic_wire.count_tokens_json(n))


async def _count(model: TokenCounter, generation: GenerationRequest) -> int:
    # Rendering the template and tokenizing may take a while on a long conversation: off the loop.
    return await asyncio.to_thread(model.count_tokens, generation)


async def _serve_messages(request: web.Request, outcome: Outcome) -> web.StreamResponse:
    authorize_client(request)
    body = await request.read()
    parsed = anthropic_wire.parse_messages_request(body)
    decision = route(request, parsed.model, outcome)
    if isinstance(decision, RemoteDecision):
        return await forward(request, decision, body, outcome)
    cold = is_cold(request, decision)
    message_id = anthropic_wire.new_message_id()
    choice = _generation(parsed, decision, message_id)
    reply = _Reply(parsed=parsed, message_id=message_id, model_id=decision.entry.id)
    if parsed.stream:
        return await _stream(request, reply, decision, choice, cold=cold, outcome=outcome)
    return await _collect(request, reply, decision, choice, cold=cold, outcome=outcome)


@dataclass(kw_only=True)
class _Reply:
    """One message being written: the edge's stop matching, the tool-call parser, the content blocks."""

    parsed: anthropic_wire.MessagesRequest
    message_id: str
    model_id: str
    stops: StopStringMatcher = field(init=False)
    parser: ToolCallParser | None = field(init=False)
    stop_sequence: str | None = None
    calls: int = 0
    text: list[str] = field(default_factory=list)  # everything the model said
    emitted: str = ""  # what passed the stop matching

    def __post_init__(self) -> None:
        self.stops = StopStringMatcher(self.parsed.stop_sequences)
        self.parser = ToolCallParser() if self.parsed.parses_calls else None

    def feed(self, text: str) -> tuple[list[Piece], bool]:
        """The pieces `text` makes, and whether a stop sequence just completed (stop the model)."""
        was_stopped = self.stops.stopped
        out, stopped = self.stops.feed(text)
        self.text.append(text)
        if stopped and not was_stopped:
            self.stop_sequence = self._matched()
        return self._pieces(out), stopped and not was_stopped

    def finish(self) -> list[Piece]:
        pieces = [] if self.stops.stopped else self._pieces(self.stops.flush())
        if self.parser is not None:
            pieces += self.parser.finish()
        return pieces

    def _pieces(self, text: str) -> list[Piece]:
        self.emitted += text
        if self.parser is None:
            return [Text(text)] if text else []
        return self.parser.feed(text) if text else []

    def _matched(self) -> str | None:
        """The stop sequence that ended the text: the one found right after what was emitted."""
        rest = "".join(self.text)[len(self.emitted) :]
        found = [s for s in self.parsed.stop_sequences if s in rest]
        return min(found, key=lambda s: rest.index(s) + len(s)) if found else None

    def stop_reason(self, final: FinalEvent) -> anthropic_wire.StopReason:
        if self.calls:
            return "tool_use"
        if self.stop_sequence is not None:
            return "stop_sequence"
        return "max_tokens" if final.finish_reason == "length" else "end_turn"


def _call(call: Call) -> ToolCall:
    return ToolCall(id=anthropic_wire.new_tool_use_id(), name=call.name, arguments=call.arguments)


async def _collect(
    request: web.Request,
    reply: _Reply,
    decision: LocalDecision,
    choice: Choice,
    *,
    cold: bool,
    outcome: Outcome,
) -> web.StreamResponse:
    timing = Timing(request, outcome, cold)
    pieces: list[Piece] = []
    final: FinalEvent | None = None
    async with decision.acquire() as model:
        context = model.context_length
        choices = fit_to_model(
            anthropic_wire.capped(reply.parsed.sampling, context), decision, [choice], context
        )
        merged = Merged(model, choices)
        try:
            while (item := await merged.next()) is not None:
                _, event = item
                if isinstance(event, Delta):
                    if event.text:
                        timing.token()
                        new, stopped = reply.feed(event.text)
                        pieces += new
                        if stopped:
                            await merged.model.abort(merged.choices[0].generation.request_id)
                else:
                    final = event
        finally:
            await merged.aclose()
    if final is None:
        raise ModelFault("the model ended without a result")
    pieces += reply.finish()
    timing.done(final.usage)
    content: list[dict[str, Any]] = []
    for piece in pieces:
        if isinstance(piece, Text):
            if content and content[-1]["type"] == "text":
                content[-1]["text"] += piece.text
            elif piece.text:
                content.append(anthropic_wire.text_block(piece.text))
        else:
            reply.calls += 1
            content.append(anthropic_wire.tool_use_block(_call(piece)))
    return json_body_response(
        anthropic_wire.message_json(
            id=reply.message_id,
            model=reply.model_id,
            content=content,
            stop_reason=reply.stop_reason(final),
            stop_sequence=reply.stop_sequence,
            usage=final.usage,
        )
    )


class _ClientGone(Exception):
    """The client closed the connection while we were writing to it."""


class _Blocks:
    """Writes a stream's content blocks: a text block stays open across deltas, a tool call is a whole
    block of its own."""

    def __init__(self, response: web.StreamResponse, reply: _Reply) -> None:
        self.response = response
        self.reply = reply
        self.index = -1
        self.text_open = False

    async def write(self, data: bytes) -> None:
        try:
            await self.response.write(data)
        except ConnectionError as exc:
            raise _ClientGone() from exc

    async def close_text(self) -> None:
        if self.text_open:
            await self.write(anthropic_wire.content_block_stop(self.index))
            self.text_open = False

    async def pieces(self, pieces: list[Piece]) -> None:
        for piece in pieces:
            if isinstance(piece, Text):
                if not piece.text:
                    continue
                if not self.text_open:
                    self.index += 1
                    self.text_open = True
                    await self.write(
                        anthropic_wire.content_block_start(self.index, anthropic_wire.text_block(""))
                    )
                await self.write(anthropic_wire.text_delta(self.index, piece.text))
            else:
                await self.close_text()
                call = _call(piece)
                self.reply.calls += 1
                self.index += 1
                block = anthropic_wire.tool_use_block(call, with_input=False)
                await self.write(anthropic_wire.content_block_start(self.index, block))
                arguments = call.arguments if call.arguments.strip() else "{}"
                await self.write(anthropic_wire.input_json_delta(self.index, arguments))
                await self.write(anthropic_wire.content_block_stop(self.index))


async def _stream(
    request: web.Request,
    reply: _Reply,
    decision: LocalDecision,
    choice: Choice,
    *,
    cold: bool,
    outcome: Outcome,
) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers=sse.HEADERS)
    timing = Timing(request, outcome, cold)
    try:
        return await _stream_body(request, reply, decision, choice, response=response, timing=timing)
    except asyncio.CancelledError:
        await tell_stopped(request, response, anthropic_wire.error_event)
        raise


async def _stream_body(
    request: web.Request,
    reply: _Reply,
    decision: LocalDecision,
    choice: Choice,
    *,
    response: web.StreamResponse,
    timing: Timing,
) -> web.StreamResponse:
    outcome = timing.outcome
    blocks = _Blocks(response, reply)

    async def start() -> None:
        if not response.prepared:
            await response.prepare(request)

    async def fail(exc: Exception) -> web.StreamResponse:
        err = to_helexa_error(exc)
        outcome.status = err.status
        logger.warning("stream %s failed after it started: %s", reply.message_id, err.message)
        with contextlib.suppress(ConnectionError):
            await response.write(anthropic_wire.error_event(err))
        return response

    async with contextlib.AsyncExitStack() as stack:
        # Phase 1: acquire (maybe a cold load) and wait for the first event (the prefill), keep-alives.
        def fit(model: LoadedModel) -> list[Choice]:
            context = model.context_length
            sampling = anthropic_wire.capped(reply.parsed.sampling, context)
            return fit_to_model(sampling, decision, [choice], context)

        try:
            merged, item = await open_stream(request, response, stack, decision, fit)
        except StartedFailure as failed:
            return await fail(failed.cause)

        # Phase 2: stream.
        try:
            try:
                await start()
            except ConnectionError as exc:
                raise _ClientGone() from exc
            await blocks.write(anthropic_wire.message_start(id=reply.message_id, model=reply.model_id))
            await blocks.write(anthropic_wire.ping())
            final: FinalEvent | None = None
            while item is not None:
                _, event = item
                if isinstance(event, Delta):
                    if event.text:
                        timing.token()
                        pieces, stopped = reply.feed(event.text)
                        await blocks.pieces(pieces)
                        if stopped:
                            await merged.model.abort(merged.choices[0].generation.request_id)
                else:
                    final = event
                item = await merged.next()
            if final is None:
                raise ModelFault("the model ended without a result")
            await blocks.pieces(reply.finish())
            await blocks.close_text()
            timing.done(final.usage)
            await blocks.write(
                anthropic_wire.message_delta(
                    stop_reason=reply.stop_reason(final), stop_sequence=reply.stop_sequence, usage=final.usage
                )
            )
            await blocks.write(anthropic_wire.message_stop())
        except _ClientGone as exc:
            logger.debug("stream %s: client gone: %r", reply.message_id, exc)
            outcome.status = CLIENT_CLOSED_STATUS
            return response
        except Exception as exc:
            return await fail(exc)
    with contextlib.suppress(ConnectionError):
        await response.write_eof()
    return response
