"""The inference request path of the HTTP edge: `/v1/chat/completions` and `/v1/completions`.

Flow of an inference request: read and parse the body (`mesh.server.openai_wire`) → optional API-key
check (`mesh.server.middleware.authorize_client`) → `cortex.route(model, forwarded=<FORWARDED_HEADER
present>)` → a `LocalDecision` is served here (its `acquire()` cold-loads if needed and holds an in-flight
reservation), a `RemoteDecision` goes to the `FORWARDER` the mesh provides (`mesh.routing.forwarding`).
Streams start lazily: if `acquire()` (or the prefill) takes longer than one keep-alive interval the SSE
response is started and `: keep-alive` comments flow until the first token, so a fast failure still gets
its real HTTP status, and a slow load never lets a client's idle timer fire. After the stream started, a
failure is sent as a final `data: {"error": ...}` event (no `[DONE]`). Closing the engine's generator (on
every exit path, client disconnect included) aborts the request inside the engine. A client that stops
reading is disconnected by the server itself (`mesh.server.connections`, the write stall timeout), which
ends its request here like any disconnect and releases its model.

Every request ends in one log line and its metrics (`_record`); `end_requests` ends what still runs when
the agent stops after its drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Literal

from aiohttp import web

from helexa.catalogue.entry import Task
from helexa.engine.base import (
    ChatMessage,
    Delta,
    GenerationEvent,
    GenerationRequest,
    LoadedModel,
    RequestId,
    ResponseFormat,
    SamplingParams,
    TokenLogprob,
    ToolCall,
    ToolSpec,
    Usage,
)
from helexa.engine.base import Final as FinalEvent
from helexa.engine.toolcalls import Call, Piece, Text, ToolCallParser, parse_all
from helexa.mesh import sse
from helexa.mesh.errors import HelexaError, InvalidRequest, ModelFault, ModelUnavailable
from helexa.mesh.metrics import Route
from helexa.mesh.routing.decisions import LocalDecision, RemoteDecision
from helexa.mesh.routing.peer_client import FORWARDED_HEADER
from helexa.mesh.server import openai_wire
from helexa.mesh.server.appkeys import CORTEX, FORWARDER, KEEPALIVE_INTERVAL_S, METRICS, NODE_NAME
from helexa.mesh.server.middleware import authorize_client, json_body_response, to_helexa_error
from helexa.mesh.timing import SSE_KEEPALIVE_INTERVAL_S

logger = logging.getLogger(__name__)

__all__ = [
    "CLIENT_CLOSED_STATUS",
    "OPEN_REQUESTS",
    "Choice",
    "Merged",
    "OpenRequests",
    "Outcome",
    "Serve",
    "Timing",
    "chat_completions",
    "completions",
    "end_requests",
    "fit_to_model",
    "forward",
    "is_cold",
    "open_stream",
    "route",
    "sampling_for",
    "stopping",
    "track",
]

# `status` label of a request whose client went away before the answer was complete (as nginx does).
CLIENT_CLOSED_STATUS: Final = 499

Kind = Literal["chat", "completion", "responses", "messages", "embeddings"]


@dataclass(kw_only=True, slots=True)
class OpenRequests:
    """The inference requests this app is serving (their handler tasks), so a stop can end the ones a
    drain did not see finish (`end_requests`) at once instead of waiting out aiohttp's shutdown timeout
    twice. `stopping` tells a cancelled stream to say why in a final error event."""

    tasks: set[asyncio.Task[object]] = dataclasses.field(default_factory=set)
    stopping: bool = False


OPEN_REQUESTS: Final[web.AppKey[OpenRequests]] = web.AppKey("helexa_open_requests", OpenRequests)


async def end_requests(app: web.Application, *, timeout_s: float = 1.0) -> int:
    """Cancel every inference request still running (after the drain): streams get a final error event
    saying the agent is shutting down. Waits at most `timeout_s` for them; returns how many there were."""
    open_requests = app.get(OPEN_REQUESTS)
    if open_requests is None or not open_requests.tasks:
        return 0
    open_requests.stopping = True
    tasks = list(open_requests.tasks)
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks, timeout=timeout_s)
    return len(tasks)


def stopping(request: web.Request) -> bool:
    open_requests = request.app.get(OPEN_REQUESTS)
    return open_requests is not None and open_requests.stopping


async def tell_stopped(
    request: web.Request, response: web.StreamResponse, frame: Callable[[HelexaError], bytes]
) -> None:
    """A started stream ended by the agent's stop after the drain: tell the client why, in the route's
    own error framing (`frame`), before the connection closes. Nothing when the stream had not started,
    or when the client cancelled."""
    if response.prepared and stopping(request):
        err = ModelUnavailable("this agent is shutting down", reason="draining", retry_after_s=1.0)
        await _write_quietly(response, frame(err))


async def _aclose(events: AsyncIterator[GenerationEvent]) -> None:
    """Close the engine's generator: aborts the request inside the engine if it is still running."""
    close = getattr(events, "aclose", None)
    if close is not None:
        await close()


class _ClientGone(Exception):
    """The client closed the connection while we were writing to it."""


async def _write(response: web.StreamResponse, data: bytes) -> None:
    """Write, telling a client that has gone (aiohttp raises ConnectionResetError) from any other error."""
    try:
        await response.write(data)
    except ConnectionError as exc:
        raise _ClientGone() from exc


async def _write_quietly(response: web.StreamResponse, data: bytes) -> bool:
    """Write; False when the client has gone (then there is nobody to tell)."""
    try:
        await response.write(data)
    except ConnectionError as exc:
        logger.debug("client gone while writing: %r", exc)
        return False
    return True


# ------------------------------------------------------------------------------------------------
# Inference endpoints


@dataclass(frozen=True, kw_only=True, slots=True)
class _Job:
    """What an inference request asks for, whichever endpoint it came through."""

    kind: Kind
    model: str
    sampling: openai_wire.SamplingOverrides
    stream: bool
    include_usage: bool
    prompts: tuple[openai_wire.PromptInput, ...] = ()  # completions: one or more
    messages: tuple[ChatMessage, ...] | None = None
    n: int = 1
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    response_format: ResponseFormat | None = None
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: str = "none"
    parallel_tool_calls: bool = True

    @property
    def parses_calls(self) -> bool:
        """Whether the output may hold tool calls (parsed out of the text, never shown as text)."""
        return bool(self.tools) and self.tool_choice != "none"


@dataclass(frozen=True, kw_only=True, slots=True)
class Choice:
    """One generation of a request: `n` per prompt, numbered prompt by prompt as OpenAI numbers them."""

    index: int
    generation: GenerationRequest
    echo: str | None = None  # the prompt text to put in front (`echo` with a text prompt)
    first_of_prompt: bool = True  # counts the prompt's tokens in the usage (once per prompt)


@dataclass(kw_only=True, slots=True)
class Outcome:
    """Filled in while a request is served; becomes the metrics and the one log line."""

    kind: Kind
    started: float
    model: str = "-"  # the resolved catalogue id; never the raw client string (label cardinality)
    route: Route = "local"
    node: str | None = None
    source: Literal["client", "peer"] = "client"  # peer: forwarded here by the entry agent
    status: int = 200
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None


# An inference route's work, given its request and the outcome to fill in (`track`).
Serve = Callable[[web.Request, Outcome], Awaitable[web.StreamResponse]]


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await track(request, "chat", functools.partial(_serve, kind="chat"))


async def completions(request: web.Request) -> web.StreamResponse:
    return await track(request, "completion", functools.partial(_serve, kind="completion"))


async def track(request: web.Request, kind: Kind, serve: Serve) -> web.StreamResponse:
    """Serve an inference request with `serve(request, outcome)`: tracked in `OPEN_REQUESTS`, errors
    made `HelexaError`s, and ended by its log line and metrics (`_record`). Shared by every inference
    route (`mesh.server.responses_routes` too)."""
    outcome = Outcome(kind=kind, started=time.perf_counter())
    open_requests = request.app.get(OPEN_REQUESTS)
    task = asyncio.current_task()
    if open_requests is not None and task is not None:
        open_requests.tasks.add(task)
    try:
        response = await serve(request, outcome)
        if outcome.status == 200:
            outcome.status = response.status
        return response
    except asyncio.CancelledError:
        # The client went away, or the agent ended the request at shutdown (`end_requests`).
        outcome.status = 503 if stopping(request) else CLIENT_CLOSED_STATUS
        raise
    except Exception as exc:
        err = to_helexa_error(exc)
        outcome.status = err.status
        if err is exc:
            raise
        raise err from exc
    finally:
        if open_requests is not None and task is not None:
            open_requests.tasks.discard(task)
        _record(request, outcome)


def _record(request: web.Request, outcome: Outcome) -> None:
    duration_s = time.perf_counter() - outcome.started
    request.app[METRICS].observe_request(
        model=outcome.model,
        route=outcome.route,
        status=outcome.status,
        duration_s=duration_s,
        node=outcome.node,
    )
    # One line per request (logfmt-like, so journald and log shippers can split it). A forwarded request
    # is logged by both agents: the entry agent (route=forwarded, node = the serving node; tokens and
    # TTFT are the serving agent's to count, "-" here) and the serving one (route=local source=peer).
    forwarded = outcome.route == "forwarded"
    logger.info(
        "%s model=%s route=%s node=%s source=%s status=%d prompt_tokens=%s completion_tokens=%s"
        " ttft_ms=%s duration_ms=%.1f",
        outcome.kind,
        outcome.model,
        outcome.route,
        outcome.node or "-",
        outcome.source,
        outcome.status,
        "-" if forwarded else outcome.prompt_tokens,
        "-" if forwarded else outcome.completion_tokens,
        "-" if outcome.ttft_s is None else f"{outcome.ttft_s * 1000:.1f}",
        duration_s * 1000,
    )


def _parse(kind: Kind, body: bytes) -> _Job:
    if kind == "chat":
        chat = openai_wire.parse_chat_request(body)
        return _Job(
            kind=kind,
            model=chat.model,
            sampling=chat.sampling,
            stream=chat.stream,
            include_usage=chat.include_usage,
            messages=chat.messages,
            n=chat.n,
            logprobs=chat.logprobs,
            response_format=chat.response_format,
            tools=chat.tools,
            tool_choice=chat.tool_choice,
            parallel_tool_calls=chat.parallel_tool_calls,
        )
    completion = openai_wire.parse_completion_request(body)
    if (
        completion.stream
        and completion.echo
        and (completion.logprobs is not None or any(not isinstance(p, str) for p in completion.all_prompts))
    ):
        raise InvalidRequest(
            "'echo' of prompt logprobs or of token-id prompts is not streamed; send 'stream': false.",
            param="echo",
        )
    return _Job(
        kind=kind,
        model=completion.model,
        sampling=completion.sampling,
        stream=completion.stream,
        include_usage=completion.include_usage,
        prompts=completion.all_prompts,
        n=completion.n,
        logprobs=completion.logprobs,
        echo=completion.echo,
        suffix=completion.suffix,
    )


def _choices(job: _Job, request_id: str, sampling: SamplingParams) -> list[Choice]:
    """The generations `job` asks for. With `n > 1` and a seed, choice j uses seed + j (the same seed
    for all would give n identical samples)."""

    def seeded(j: int) -> SamplingParams:
        if job.n == 1 or sampling.seed is None:
            return sampling
        return dataclasses.replace(sampling, seed=sampling.seed + j)

    def rid(index: int) -> RequestId:
        return RequestId(request_id if index == 0 else f"{request_id}-{index}")

    if job.messages is not None:
        return [
            Choice(
                index=j,
                generation=GenerationRequest(
                    request_id=rid(j),
                    sampling=seeded(j),
                    messages=job.messages,
                    logprobs=job.logprobs,
                    response_format=job.response_format,
                    tools=job.tools,
                    tool_choice=job.tool_choice,
                    parallel_tool_calls=job.parallel_tool_calls,
                ),
                first_of_prompt=j == 0,
            )
            for j in range(job.n)
        ]
    out: list[Choice] = []
    for p, prompt in enumerate(job.prompts):
        text = prompt if isinstance(prompt, str) else None
        for j in range(job.n):
            index = p * job.n + j
            generation = GenerationRequest(
                request_id=rid(index),
                sampling=seeded(j),
                prompt=text,
                prompt_ids=None if isinstance(prompt, str) else prompt,
                logprobs=job.logprobs,
                # Echo needs the prompt's own logprobs, and the text of a token-id prompt.
                prompt_logprobs=job.echo and (job.logprobs is not None or text is None),
                suffix=job.suffix,
            )
            out.append(
                Choice(
                    index=index,
                    generation=generation,
                    echo=text if job.echo else None,
                    first_of_prompt=j == 0,
                )
            )
    return out


def sampling_for(
    overrides: openai_wire.SamplingOverrides, defaults: dict[str, float | int], context_length: int | None
) -> SamplingParams:
    """Request values over catalogue defaults; `max_tokens` checked against the context length.

    A client asking for more tokens than the context holds gets a 400 naming its field; a catalogue
    default larger than the context becomes "until the context is full" (None), which is what it meant.
    """
    params = openai_wire.resolve_sampling(overrides, defaults)
    if context_length and params.max_tokens is not None and params.max_tokens > context_length:
        if overrides.max_tokens is not None:
            name = overrides.max_tokens_param
            raise InvalidRequest(
                f"'{name}' is {params.max_tokens}, more than this model's context length "
                f"({context_length} tokens).",
                param=name,
                code="context_length_exceeded",
            )
        params = dataclasses.replace(params, max_tokens=None)
    return params


def fit_to_model(
    overrides: openai_wire.SamplingOverrides,
    decision: LocalDecision,
    choices: list[Choice],
    context_length: int,
) -> list[Choice]:
    """Check `max_tokens` again against the loaded model's own context length (known only now)."""
    if context_length <= 0 or context_length == decision.entry.context_length:
        return choices
    sampling = sampling_for(overrides, decision.entry.defaults, context_length)
    return [
        dataclasses.replace(
            c,
            generation=dataclasses.replace(
                c.generation, sampling=dataclasses.replace(sampling, seed=c.generation.sampling.seed)
            ),
        )
        for c in choices
    ]


def route(
    request: web.Request, model: str, outcome: Outcome, *, task: Task = "generate"
) -> LocalDecision | RemoteDecision:
    """Where a request for `model` runs (here or on a peer), recorded on `outcome`.

    A model of the other task (an embedding model asked to generate, or the reverse) is refused here, with
    a 400 naming `model`, before any forwarding or cold load: the engine could not serve it anyway.
    """
    from_peer = FORWARDED_HEADER in request.headers
    if from_peer:
        outcome.source = "peer"
    decision = request.app[CORTEX].route(model, forwarded=from_peer)
    entry = decision.entry
    outcome.model = entry.id
    if entry.task != task:
        if entry.task == "embed":
            message = f"the model '{entry.id}' is an embedding model: send it to /v1/embeddings"
        else:
            message = f"the model '{entry.id}' is not an embedding model (its catalogue task is not embed)"
        raise InvalidRequest(message, param="model", code="model_not_supported")
    if not isinstance(decision, RemoteDecision):
        outcome.node = request.app.get(NODE_NAME)
    return decision


def is_cold(request: web.Request, decision: LocalDecision) -> bool:
    """Whether serving `decision` waits for a load (timings then say so)."""
    cold = getattr(decision, "cold", None)
    if isinstance(cold, bool):
        return cold
    listing = request.app[CORTEX].get_model(decision.entry.id)
    return listing is None or not listing.loaded


async def _serve(request: web.Request, outcome: Outcome, *, kind: Kind) -> web.StreamResponse:
    authorize_client(request)
    body = await request.read()
    job = _parse(kind, body)
    decision = route(request, job.model, outcome)
    if isinstance(decision, RemoteDecision):
        return await forward(request, decision, body, outcome)
    cold = is_cold(request, decision)
    sampling = sampling_for(job.sampling, decision.entry.defaults, decision.entry.context_length)
    request_id = openai_wire.new_chat_id() if kind == "chat" else openai_wire.new_completion_id()
    choices = _choices(job, request_id, sampling)
    answer = _stream if job.stream else _collect
    return await answer(
        request,
        job=job,
        decision=decision,
        request_id=request_id,
        choices=choices,
        cold=cold,
        outcome=outcome,
    )


async def forward(
    request: web.Request, decision: RemoteDecision, body: bytes, outcome: Outcome
) -> web.StreamResponse:
    outcome.route = "forwarded"
    outcome.node = decision.node.name
    forwarder = request.app.get(FORWARDER)
    if forwarder is None:
        raise ModelUnavailable(
            f"the model '{decision.entry.id}' is served by another node and this agent cannot forward",
            reason="no_forwarder",
        )
    return await forwarder(request, decision, body)


class Timing:
    """Time to first token and inter-token latency for one request, straight into the metrics."""

    __slots__ = ("cold", "last", "metrics", "model", "outcome")

    def __init__(self, request: web.Request, outcome: Outcome, cold: bool) -> None:
        self.metrics = request.app[METRICS]
        self.outcome = outcome
        self.model = outcome.model
        self.cold = cold
        self.last: float | None = None

    def token(self) -> None:
        now = time.perf_counter()
        if self.last is None:
            self.outcome.ttft_s = now - self.outcome.started
            self.metrics.observe_ttft(model=self.model, cold=self.cold, seconds=self.outcome.ttft_s)
        else:
            self.metrics.observe_inter_token(model=self.model, seconds=now - self.last)
        self.last = now

    def done(self, usage: Usage) -> None:
        self.outcome.prompt_tokens = usage.prompt_tokens
        self.outcome.completion_tokens = usage.completion_tokens
        self.metrics.add_tokens(
            model=self.model, prompt=usage.prompt_tokens, completion=usage.completion_tokens
        )


class StartedFailure(Exception):
    """Opening a stream failed after keep-alives were sent: the answer is a final error event, since the
    HTTP status is already 200 (`cause` is what failed)."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


async def open_stream(
    request: web.Request,
    response: web.StreamResponse,
    stack: contextlib.AsyncExitStack,
    decision: LocalDecision,
    fit: Callable[[LoadedModel], list[Choice]],
) -> tuple[Merged, tuple[int, GenerationEvent] | None]:
    """Phase one of every streamed answer: acquire the model (maybe a cold load), start the generations
    `fit(model)` gives and wait for the first event (the prefill), sending SSE keep-alives meanwhile.

    The response is started only if that takes longer than one keep-alive interval, so a fast failure
    still gets its real HTTP status (raised as it is); a failure after the start raises `StartedFailure`.
    The model's reservation and the generations are closed with `stack`."""

    async def start() -> None:
        if not response.prepared:
            await response.prepare(request)

    interval_s = request.app.get(KEEPALIVE_INTERVAL_S, SSE_KEEPALIVE_INTERVAL_S)
    try:
        async with sse.keepalive(start, response.write, interval_s):
            model = await stack.enter_async_context(decision.acquire())
            merged = Merged(model, fit(model))
            stack.push_async_callback(merged.aclose)
            return merged, await merged.next()
    except Exception as exc:
        if not response.prepared:
            raise  # nothing sent yet: the middleware answers with the real status
        raise StartedFailure(exc) from exc


class Merged:
    """The events of several generations as one stream of `(choice index, event)`, in arrival order.

    Each generation is read by its own task; closing the merged stream (on every exit path) cancels the
    readers and closes every generator, which aborts the requests inside the engine.
    """

    def __init__(self, model: LoadedModel, choices: list[Choice]) -> None:
        self.model = model
        self.choices = choices
        self._queue: asyncio.Queue[tuple[int, GenerationEvent | BaseException]] = asyncio.Queue()
        self._streams = [(c.index, model.generate(c.generation)) for c in choices]
        self._tasks = [asyncio.ensure_future(self._read(i, events)) for i, events in self._streams]
        self._open = len(self._tasks)

    async def _read(self, index: int, events: AsyncIterator[GenerationEvent]) -> None:
        try:
            async for event in events:
                self._queue.put_nowait((index, event))
        except Exception as exc:
            self._queue.put_nowait((index, exc))

    async def next(self) -> tuple[int, GenerationEvent] | None:
        """The next event of any generation; None once every one has sent its `Final`."""
        if self._open == 0:
            return None
        index, item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, FinalEvent):
            self._open -= 1
        return index, item

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for _, events in self._streams:
            await _aclose(events)


def _tool_call(call: Call) -> ToolCall:
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=call.name, arguments=call.arguments)


def _total(finals: dict[int, FinalEvent], choices: list[Choice]) -> Usage:
    """Usage over every choice: each prompt's tokens once, every choice's completion tokens."""
    prompt = sum(finals[c.index].usage.prompt_tokens for c in choices if c.first_of_prompt)
    completion = sum(f.usage.completion_tokens for f in finals.values())
    return Usage(prompt_tokens=prompt, completion_tokens=completion)


def _choice_logprobs(
    kind: Kind, choice: Choice, entries: list[TokenLogprob], final: FinalEvent
) -> dict[str, object] | None:
    if choice.generation.logprobs is None:
        return None
    if kind == "chat":
        return openai_wire.chat_logprobs(entries)
    prompt = (
        list(final.prompt_logprobs) if choice.echo is not None or choice.generation.prompt is None else []
    )
    return openai_wire.completion_logprobs([*prompt, *entries] if prompt else entries)


def _echo_text(choice: Choice, final: FinalEvent) -> str:
    if choice.echo is not None:
        return choice.echo
    if choice.generation.prompt_logprobs and choice.generation.prompt is None:
        return "".join(e.text for e in final.prompt_logprobs)  # a token-id prompt, decoded
    return ""


async def _collect(
    request: web.Request,
    *,
    job: _Job,
    decision: LocalDecision,
    request_id: str,
    choices: list[Choice],
    cold: bool,
    outcome: Outcome,
) -> web.StreamResponse:
    timing = Timing(request, outcome, cold)
    pieces: dict[int, list[str]] = {c.index: [] for c in choices}
    entries: dict[int, list[TokenLogprob]] = {c.index: [] for c in choices}
    finals: dict[int, FinalEvent] = {}
    async with decision.acquire() as model:
        choices = fit_to_model(job.sampling, decision, choices, model.context_length)
        merged = Merged(model, choices)
        try:
            while (item := await merged.next()) is not None:
                index, event = item
                if isinstance(event, Delta):
                    if event.text:
                        timing.token()
                        pieces[index].append(event.text)
                    entries[index] += event.logprobs
                else:
                    finals[index] = event
                    entries[index] += event.logprobs
        finally:
            await merged.aclose()
    if len(finals) != len(choices):
        raise ModelFault("the model ended without a result")
    usage = _total(finals, choices)
    timing.done(usage)
    outputs = []
    for c in choices:
        text = (_echo_text(c, finals[c.index]) if job.echo else "") + "".join(pieces[c.index])
        finish: openai_wire.WireFinish = finals[c.index].finish_reason
        calls: tuple[ToolCall, ...] = ()
        if job.parses_calls:
            text, parsed = parse_all(text)
            calls = tuple(_tool_call(p) for p in parsed)
            if calls:
                finish = "tool_calls"
        outputs.append(
            openai_wire.ChoiceOutput(
                index=c.index,
                text=text,
                finish_reason=finish,
                logprobs=_choice_logprobs(job.kind, c, entries[c.index], finals[c.index]),
                tool_calls=calls,
            )
        )
    builder = openai_wire.chat_completion if job.kind == "chat" else openai_wire.text_completion
    return json_body_response(
        builder(
            id=request_id, model=decision.entry.id, created=int(time.time()), choices=outputs, usage=usage
        )
    )


async def _stream(
    request: web.Request,
    *,
    job: _Job,
    decision: LocalDecision,
    request_id: str,
    choices: list[Choice],
    cold: bool,
    outcome: Outcome,
) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers=sse.HEADERS)
    timing = Timing(request, outcome, cold)
    chat = job.kind == "chat"
    model_id, created = decision.entry.id, int(time.time())
    offsets = {c.index: 0 for c in choices}  # completions' logprob text offsets, per choice
    # Tool calls are parsed out of each choice's text as it streams; their markup never shows.
    parsers = {c.index: ToolCallParser() for c in choices} if job.parses_calls else {}
    calls_sent = {c.index: 0 for c in choices}

    async def write_pieces(index: int, pieces: list[Piece], entries: tuple[TokenLogprob, ...]) -> None:
        for piece in pieces:
            if isinstance(piece, Text):
                if piece.text:
                    await _write(response, chunk(index, piece.text, entries=entries))
                    entries = ()
            else:
                call = _tool_call(piece)
                data = openai_wire.chat_chunk(
                    id=request_id,
                    model=model_id,
                    created=created,
                    index=index,
                    tool_call=(calls_sent[index], call),
                    usage_null=job.include_usage,
                )
                calls_sent[index] += 1
                await _write(response, sse.event(data))

    async def start() -> None:
        if not response.prepared:
            await response.prepare(request)

    def logprobs(index: int, entries: tuple[TokenLogprob, ...], text: str) -> dict[str, object] | None:
        if job.logprobs is None:
            return None
        if chat:
            return openai_wire.chat_logprobs(entries)
        out = openai_wire.completion_logprobs(entries, offset=offsets[index])
        offsets[index] += len(text)
        return out

    def chunk(
        index: int,
        text: str | None,
        finish: openai_wire.WireFinish | None = None,
        role: bool = False,
        entries: tuple[TokenLogprob, ...] = (),
    ) -> bytes:
        lp = logprobs(index, entries, text or "") if (entries or finish is None) and not role else None
        if chat:
            data = openai_wire.chat_chunk(
                id=request_id,
                model=model_id,
                created=created,
                content=text,
                role=role,
                finish_reason=finish,
                index=index,
                logprobs=lp,
                usage_null=job.include_usage,
            )
        else:
            data = openai_wire.completion_chunk(
                id=request_id,
                model=model_id,
                created=created,
                text=text or "",
                finish_reason=finish,
                index=index,
                logprobs=lp,
                usage_null=job.include_usage,
            )
        return sse.event(data)

    async def fail(exc: Exception) -> web.StreamResponse:
        err = to_helexa_error(exc)
        outcome.status = err.status
        logger.warning("stream %s failed after it started: %s", request_id, err.message)
        await _write_quietly(response, sse.error_event(err))
        return response

    try:
        async with contextlib.AsyncExitStack() as stack:
            # Phase 1: acquire (maybe a cold load) and wait for the first event (the prefill), keep-alives.
            try:
                merged, first = await open_stream(
                    request,
                    response,
                    stack,
                    decision,
                    lambda model: fit_to_model(job.sampling, decision, choices, model.context_length),
                )
            except StartedFailure as failed:
                return await fail(failed.cause)
            choices = merged.choices

            # Phase 2: stream.
            try:
                try:
                    await start()
                except ConnectionError as exc:
                    raise _ClientGone() from exc
                for c in choices:
                    if chat:
                        await _write(response, chunk(c.index, "", role=True))
                    elif c.echo:
                        await _write(
                            response,
                            sse.event(
                                openai_wire.completion_chunk(
                                    id=request_id,
                                    model=model_id,
                                    created=created,
                                    text=c.echo,
                                    index=c.index,
                                    usage_null=job.include_usage,
                                )
                            ),
                        )
                finals: dict[int, FinalEvent] = {}
                item = first
                while item is not None:
                    index, event = item
                    if isinstance(event, Delta):
                        if event.text:
                            timing.token()
                            parser = parsers.get(index)
                            if parser is None:
                                await _write(response, chunk(index, event.text, entries=event.logprobs))
                            else:
                                await write_pieces(index, parser.feed(event.text), event.logprobs)
                    else:
                        finals[index] = event
                        finish: openai_wire.WireFinish = event.finish_reason
                        parser = parsers.get(index)
                        if parser is not None:
                            await write_pieces(index, parser.finish(), ())
                            if calls_sent[index]:
                                finish = "tool_calls"
                        await _write(
                            response,
                            chunk(index, None if chat else "", finish=finish, entries=event.logprobs),
                        )
                    item = await merged.next()
                if len(finals) != len(choices):
                    raise ModelFault("the model ended without a result")
                usage = _total(finals, choices)
                timing.done(usage)
                if job.include_usage:
                    usage_chunk = openai_wire.chat_usage_chunk if chat else openai_wire.completion_usage_chunk
                    await _write(
                        response,
                        sse.event(usage_chunk(id=request_id, model=model_id, created=created, usage=usage)),
                    )
                await _write(response, sse.DONE)
            except _ClientGone as exc:
                logger.debug("stream %s: client gone: %r", request_id, exc)
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
