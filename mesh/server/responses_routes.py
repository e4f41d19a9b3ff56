"""`POST /v1/responses` (OpenAI's Responses API, stateless): the handler.

The request path is chat's (`mesh.server.inference`): the body is parsed (`mesh.server.responses_wire`),
the client's key checked, the model routed (`cortex.route`); a remote decision is forwarded as raw bytes
to the serving agent's `FORWARD_PREFIX + "/v1/responses"` (`mesh.server.peer_routes`), a local one is
acquired (cold-loading if needed) and generated from as one chat generation. Function calls are parsed
out of the text (`helexa.engine.toolcalls`) as chat does and become `function_call` output items.

A stream starts lazily as chat's does (keep-alive comments while a load or the prefill takes longer than
one interval, so a fast failure keeps its real HTTP status); after it started, a failure is a final
`data: {"error": ...}` event, which the SDKs raise. The request is tracked, logged and measured as
`kind=responses` (`inference.track`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import orjson
from aiohttp import web

from helexa.engine.base import Delta, GenerationRequest, RequestId, ToolCall
from helexa.engine.base import Final as FinalEvent
from helexa.engine.toolcalls import Call, Piece, ToolCallParser, parse_all
from helexa.mesh import sse
from helexa.mesh.errors import ModelFault
from helexa.mesh.routing.decisions import LocalDecision, RemoteDecision
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
from helexa.mesh.server.responses_wire import (
    ResponsesRequest,
    ResponseStream,
    function_call_item,
    message_item,
    new_item_id,
    new_response_id,
    parse_responses_request,
    response_object,
)

logger = logging.getLogger(__name__)

__all__ = ["RESPONSES_PATH", "add_responses_routes", "create_response"]

RESPONSES_PATH = "/v1/responses"


def add_responses_routes(app: web.Application) -> None:
    """Register `POST /v1/responses` (the peer route is `mesh.server.peer_routes`'s)."""
    app.router.add_post(RESPONSES_PATH, create_response)


async def create_response(request: web.Request) -> web.StreamResponse:
    return await track(request, "responses", _serve)


def _tool_call(call: Call) -> ToolCall:
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=call.name, arguments=call.arguments)


async def _serve(request: web.Request, outcome: Outcome) -> web.StreamResponse:
    authorize_client(request)
    body = await request.read()
    job = parse_responses_request(body)
    decision = route(request, job.model, outcome)
    if isinstance(decision, RemoteDecision):
        return await forward(request, decision, body, outcome)
    cold = is_cold(request, decision)
    response_id = new_response_id()
    sampling = sampling_for(job.sampling, decision.entry.defaults, decision.entry.context_length)
    choice = Choice(
        index=0,
        generation=GenerationRequest(
            request_id=RequestId(response_id),
            sampling=sampling,
            messages=job.messages,
            response_format=job.response_format,
            tools=job.tools,
            tool_choice=job.tool_choice,
            parallel_tool_calls=job.parallel_tool_calls,
        ),
    )
    timing = Timing(request, outcome, cold)
    if job.stream:
        return await _stream(
            request,
            job=job,
            decision=decision,
            choice=choice,
            response_id=response_id,
            timing=timing,
            outcome=outcome,
        )
    return await _collect(job, decision, choice, response_id, timing)


async def _collect(
    job: ResponsesRequest,
    decision: LocalDecision,
    choice: Choice,
    response_id: str,
    timing: Timing,
) -> web.StreamResponse:
    created_at = int(time.time())
    pieces: list[str] = []
    final: FinalEvent | None = None
    async with decision.acquire() as model:
        choices = fit_to_model(job.sampling, decision, [choice], model.context_length)
        merged = Merged(model, choices)
        try:
            while (item := await merged.next()) is not None:
                _, event = item
                if isinstance(event, Delta):
                    if event.text:
                        timing.token()
                        pieces.append(event.text)
                else:
                    final = event
        finally:
            await merged.aclose()
    if final is None:
        raise ModelFault("the model ended without a result")
    timing.done(final.usage)
    text = "".join(pieces)
    calls: list[ToolCall] = []
    if job.parses_calls:
        text, parsed = parse_all(text)
        calls = [_tool_call(p) for p in parsed]
    incomplete = final.finish_reason == "length" and not calls
    output = []
    if text.strip() or not calls:
        output.append(message_item(new_item_id("msg"), text, "incomplete" if incomplete else "completed"))
    output += [function_call_item(new_item_id("fc"), c) for c in calls]
    answer = response_object(
        job,
        id=response_id,
        model=decision.entry.id,
        created_at=created_at,
        status="incomplete" if incomplete else "completed",
        output=output,
        usage=final.usage,
    )
    return json_body_response(orjson.dumps(answer))


class _ClientGone(Exception):
    """The client closed the connection while we were writing to it."""


async def _stream(
    request: web.Request,
    *,
    job: ResponsesRequest,
    decision: LocalDecision,
    choice: Choice,
    response_id: str,
    timing: Timing,
    outcome: Outcome,
) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers=sse.HEADERS)
    events = ResponseStream(job, id=response_id, model=decision.entry.id, created_at=int(time.time()))
    parser = ToolCallParser() if job.parses_calls else None

    async def start() -> None:
        if not response.prepared:
            await response.prepare(request)

    async def send(frames: list[bytes]) -> None:
        try:
            for frame in frames:
                await response.write(frame)
        except ConnectionError as exc:
            raise _ClientGone() from exc

    def frames_of(pieces: list[Piece]) -> list[bytes]:
        out: list[bytes] = []
        for piece in pieces:
            out += events.call(_tool_call(piece)) if isinstance(piece, Call) else events.text(piece.text)
        return out

    async def fail(exc: Exception) -> web.StreamResponse:
        err = to_helexa_error(exc)
        outcome.status = err.status
        logger.warning("response stream %s failed after it started: %s", response_id, err.message)
        with contextlib.suppress(ConnectionError):
            await response.write(sse.error_event(err))
        return response

    try:
        async with contextlib.AsyncExitStack() as stack:
            # Phase 1: acquire (maybe a cold load) and wait for the first event (the prefill), keep-alives.
            try:
                merged, item = await open_stream(
                    request,
                    response,
                    stack,
                    decision,
                    lambda model: fit_to_model(job.sampling, decision, [choice], model.context_length),
                )
            except StartedFailure as failed:
                return await fail(failed.cause)

            # Phase 2: stream.
            try:
                try:
                    await start()
                except ConnectionError as exc:
                    raise _ClientGone() from exc
                await send(events.start())
                final: FinalEvent | None = None
                while item is not None:
                    _, event = item
                    if isinstance(event, Delta):
                        if event.text:
                            timing.token()
                            pieces = parser.feed(event.text) if parser is not None else None
                            await send(events.text(event.text) if pieces is None else frames_of(pieces))
                    else:
                        final = event
                        if parser is not None:
                            await send(frames_of(parser.finish()))
                    item = await merged.next()
                if final is None:
                    raise ModelFault("the model ended without a result")
                timing.done(final.usage)
                called = any(o["type"] == "function_call" for o in events.output)
                await send(events.end(final.usage, incomplete=final.finish_reason == "length" and not called))
            except _ClientGone as exc:
                logger.debug("response stream %s: client gone: %r", response_id, exc)
                outcome.status = CLIENT_CLOSED_STATUS
                return response
            except Exception as exc:
                return await fail(exc)
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response
    except asyncio.CancelledError:
        await tell_stopped(request, response, sse.error_event)
        raise
