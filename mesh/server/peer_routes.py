"""The peer API, `/mesh/peer/...`: what agents ask of each other (paths in `mesh.routing.peer_client`).

    POST /mesh/peer/gossip                 a gossip exchange (`mesh.gossip.transport.gossip_handler`)
    POST /mesh/peer/v1/chat/completions    forwarded inference, served here, never routed again
    POST /mesh/peer/v1/completions
    POST /mesh/peer/v1/messages            (and .../count_tokens: Anthropic's Messages API)
    POST /mesh/peer/v1/responses
    POST /mesh/peer/v1/embeddings
    POST /mesh/peer/load    {"model"}      load on this node (operator loads placed here); returns when loaded
    POST /mesh/peer/unload  {"model"}      unload from this node
    POST /mesh/peer/hello   {}             a signed reply: proves this agent holds the key

With a mesh key every request under `/mesh/peer/` must carry a valid HMAC signature bound to this agent
(`mesh.gossip.auth.peer_auth_middleware`, installed in front of the error middleware); peers without the
key are refused with 401 and logged once. On an open mesh with client API keys the same holds for every
path but gossip, with the key derived from the client keys. Either way the signature is what authorizes a
forwarded request: the entry agent checked the client's key, which never travels. Handlers read the
agent from the app (`AGENT`).

A forwarded non-streamed request that asks for a deferred answer (`DEFERRED_HEADER`) is answered at once
with `200` and a space every keep-alive interval while it runs, then its real status and body
(`mesh.routing.peer_client`), so that the entry agent's stall timeout tells a slow answer from a frozen
agent. One that is done within the first interval gets its plain answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import orjson
from aiohttp import web

from helexa.mesh import errors
from helexa.mesh.gossip.transport import GOSSIP_PATH, Responder, gossip_handler
from helexa.mesh.routing.peer_client import (
    DEFERRED_HEADER,
    FORWARD_PREFIX,
    FORWARDED_HEADER,
    HELLO_PATH,
    LOAD_PATH,
    UNLOAD_PATH,
)
from helexa.mesh.server.anthropic_routes import COUNT_TOKENS_PATH, count_tokens, messages
from helexa.mesh.server.anthropic_wire import MESSAGES_PATH
from helexa.mesh.server.appkeys import AGENT, CLIENT_AUTHORIZED, KEEPALIVE_INTERVAL_S
from helexa.mesh.server.embeddings_routes import EMBEDDINGS_PATH, create_embeddings
from helexa.mesh.server.inference import chat_completions, completions
from helexa.mesh.server.middleware import Handler, error_response, to_helexa_error
from helexa.mesh.server.responses_routes import RESPONSES_PATH, create_response
from helexa.mesh.timing import FORWARD_KEEPALIVE_INTERVAL_S

log = logging.getLogger(__name__)

__all__ = ["add_peer_routes"]


def _forwarded(handler: Handler) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        if FORWARDED_HEADER not in request.headers:
            raise errors.InvalidRequest(f"peer inference requests carry {FORWARDED_HEADER}")
        # With a mesh key, or client keys on an open mesh, the middleware has verified the peer (it holds
        # the same key), and the entry agent checked the client. Without either, there is no client key
        # here to check.
        if request.app[AGENT].mesh.auth is not None:
            request[CLIENT_AUTHORIZED] = True
        if request.headers.get(DEFERRED_HEADER) == "1" and not _wants_stream(await request.read()):
            return await _deferred(request, handler)
        return await handler(request)

    return handle


def _wants_stream(body: bytes) -> bool:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(data, dict) and data.get("stream") is True


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The handler's response, or the error response the middleware would have made of its exception."""
    try:
        return await handler(request)
    except Exception as exc:
        return error_response(to_helexa_error(exc), request.path)


def _result(task: asyncio.Task[web.StreamResponse], path: str) -> web.Response:
    """The buffered answer of a finished handler task (the agent ending it at shutdown: a 503); errors
    in the envelope of the route (`path`)."""
    try:
        answer = task.result()
    except asyncio.CancelledError:
        answer = error_response(
            errors.ModelUnavailable("this agent is shutting down", reason="draining", retry_after_s=1.0),
            path,
        )
    if not isinstance(answer, web.Response) or answer.prepared:
        log.error("a non-streamed forwarded request was answered with a stream")
        answer = error_response(errors.InternalError(), path)
    return answer


async def _deferred(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Serve a non-streamed forwarded request with keep-alive spaces until its answer is ready (see the
    module docstring); a client (the entry agent) that goes away cancels the work."""
    interval_s = request.app.get(KEEPALIVE_INTERVAL_S, FORWARD_KEEPALIVE_INTERVAL_S)
    task = asyncio.create_task(_answer(request, handler), name="deferred answer")
    try:
        await asyncio.wait({task}, timeout=interval_s)
        if task.done():
            return _result(task, request.path)
        out = web.StreamResponse(
            status=200, headers={DEFERRED_HEADER: "1", "Content-Type": "application/json"}
        )
        await out.prepare(request)
        while not task.done():
            await out.write(b" ")
            await asyncio.wait({task}, timeout=interval_s)
        answer = _result(task, request.path)
        headers = {
            k: answer.headers[k] for k in ("Content-Type", "Retry-After", "Allow") if k in answer.headers
        }
        body = answer.body if isinstance(answer.body, bytes) else b""
        await out.write(orjson.dumps({"status": answer.status, "headers": headers}) + b"\n" + body)
        await out.write_eof()
        return out
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def hello(request: web.Request) -> web.StreamResponse:
    """Nothing but a reply the middleware signs: the peer asking proves this agent holds the key."""
    agent = request.app[AGENT]
    return web.json_response({"node": agent.identity.node_id})


async def _model_of(request: web.Request) -> str:
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise errors.InvalidRequest("the body must be a JSON object") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, str) or not model:
        raise errors.InvalidRequest("'model' is required", param="model")
    return model


async def load(request: web.Request) -> web.StreamResponse:
    agent = request.app[AGENT]
    entry = agent.cortex.resolve(await _model_of(request))
    try:
        await agent.neuron.ensure_loaded(entry)
    except errors.HelexaError as e:
        # Only the operator API calls this: the reason a load failed goes back to the operator.
        raise agent.neuron.with_load_detail(entry.id, e) from None
    name = agent.config.name
    return web.json_response({"message": f"{entry.id} is loaded on {name}", "node": name})


async def unload(request: web.Request) -> web.StreamResponse:
    agent = request.app[AGENT]
    model = await _model_of(request)
    entry = agent.cortex.catalogue.resolve(model)
    model_id = entry.id if entry is not None else model
    done = await agent.neuron.unload(model_id, reason="operator")
    name = agent.config.name
    message = f"{model_id} unloaded from {name}" if done else f"{model_id} was not loaded on {name}"
    return web.json_response({"message": message, "node": name, "unloaded": done})


def add_peer_routes(app: web.Application, gossip: Responder) -> None:
    """Register the peer API; `gossip` answers the exchanges."""
    app.router.add_post(GOSSIP_PATH, gossip_handler(gossip))
    app.router.add_post(FORWARD_PREFIX + "/v1/chat/completions", _forwarded(chat_completions))
    app.router.add_post(FORWARD_PREFIX + "/v1/completions", _forwarded(completions))
    app.router.add_post(FORWARD_PREFIX + RESPONSES_PATH, _forwarded(create_response))
    app.router.add_post(FORWARD_PREFIX + EMBEDDINGS_PATH, _forwarded(create_embeddings))
    app.router.add_post(FORWARD_PREFIX + MESSAGES_PATH, _forwarded(messages))
    app.router.add_post(FORWARD_PREFIX + COUNT_TOKENS_PATH, _forwarded(count_tokens))
    app.router.add_post(LOAD_PATH, load)
    app.router.add_post(UNLOAD_PATH, unload)
    app.router.add_post(HELLO_PATH, hello)
