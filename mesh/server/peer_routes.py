"""The peer API, `/mesh/peer/...`: what agents ask of each other (paths in `mesh.routing.peer_client`).

    POST /mesh/peer/gossip                 a gossip exchange (`mesh.gossip.transport.gossip_handler`)
    POST /mesh/peer/v1/chat/completions    forwarded inference, served here, never routed again
    POST /mesh/peer/v1/completions
    POST /mesh/peer/load    {"model"}      load on this node (operator loads placed here); returns when loaded
    POST /mesh/peer/unload  {"model"}      unload from this node

With a mesh key every request under `/mesh/peer/` must carry a valid HMAC signature
(`mesh.gossip.auth.peer_auth_middleware`, installed in front of the error middleware); peers without the
key are refused with 401 and logged once. Handlers read the agent from the app (`AGENT`).
"""

from __future__ import annotations

import logging

import orjson
from aiohttp import web

from helexa.mesh import errors
from helexa.mesh.gossip.transport import GOSSIP_PATH, Responder, gossip_handler
from helexa.mesh.routing.peer_client import (
    CLIENT_AUTH_HEADER,
    FORWARD_PREFIX,
    FORWARDED_HEADER,
    LOAD_PATH,
    UNLOAD_PATH,
)
from helexa.mesh.server.appkeys import AGENT, API_KEYS, CLIENT_AUTHORIZED
from helexa.mesh.server.inference import chat_completions, completions
from helexa.mesh.server.middleware import Handler, bearer_check

log = logging.getLogger(__name__)

__all__ = ["add_peer_routes"]


def _client_key_ok(request: web.Request) -> bool:
    """Open mesh: the client's key, carried by the entry agent, checked against this agent's keys."""
    keys = request.app.get(API_KEYS)
    return not keys or bearer_check(request.headers.get(CLIENT_AUTH_HEADER, ""), keys) == "ok"


def _forwarded(handler: Handler) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        if FORWARDED_HEADER not in request.headers:
            raise errors.InvalidRequest(f"peer inference requests carry {FORWARDED_HEADER}")
        # With a mesh key the middleware has verified the peer; the entry agent checked the client.
        if request.app[AGENT].mesh.auth is not None or _client_key_ok(request):
            request[CLIENT_AUTHORIZED] = True
        return await handler(request)

    return handle


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
    app.router.add_post(LOAD_PATH, load)
    app.router.add_post(UNLOAD_PATH, unload)
