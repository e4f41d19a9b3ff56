"""The peer API, `/mesh/peer/...`: what agents ask of each other.

    POST /mesh/peer/gossip                 a gossip exchange (`mesh.gossip.gossip_handler`)
    POST /mesh/peer/v1/chat/completions    forwarded inference, served here, never routed again
    POST /mesh/peer/v1/completions
    POST /mesh/peer/load    {"model"}      load on this node (operator loads placed here); returns when loaded
    POST /mesh/peer/unload  {"model"}      unload from this node

With a mesh key every request under `/mesh/peer/` must carry a valid HMAC signature
(`mesh.auth.peer_auth_middleware`, installed in front of the error middleware); peers without the key are
refused with 401 and logged once. `call_peer` is the client side for load/unload.
"""

from __future__ import annotations

import hmac
import logging
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

from helexa.mesh import errors
from helexa.mesh.fleet.records import NodeRecord
from helexa.mesh.gossip.auth import NONCE_HEADER
from helexa.mesh.gossip.exchange import GOSSIP_PATH, PeerAddr, gossip_handler
from helexa.mesh.routing.forwarding import CLIENT_AUTH_HEADER, FORWARD_PREFIX
from helexa.mesh.server.appkeys import API_KEYS, CLIENT_AUTHORIZED
from helexa.mesh.server.openai_routes import FORWARDED_HEADER, Handler, chat_completions, completions
from helexa.mesh.timing import PROXY_CONNECT_TIMEOUT_S

if TYPE_CHECKING:
    from helexa.mesh.agent import Agent

log = logging.getLogger(__name__)

__all__ = ["LOAD_PATH", "UNLOAD_PATH", "PeerCallError", "add_peer_routes", "call_peer"]

LOAD_PATH = "/mesh/peer/load"
UNLOAD_PATH = "/mesh/peer/unload"


def _client_key_ok(request: web.Request) -> bool:
    """Open mesh: the client's key, carried by the entry agent, checked against this agent's keys."""
    keys = request.app.get(API_KEYS)
    if not keys:
        return True
    scheme, _, token = request.headers.get(CLIENT_AUTH_HEADER, "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    given = token.strip().encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.encode())
    return matched


def _forwarded(agent: Agent, handler: Handler) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        if FORWARDED_HEADER not in request.headers:
            raise errors.InvalidRequest(f"peer inference requests carry {FORWARDED_HEADER}")
        # With a mesh key the middleware has verified the peer; the entry agent checked the client.
        if agent.mesh.auth is not None or _client_key_ok(request):
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


def add_peer_routes(app: web.Application, agent: Agent) -> None:
    app.router.add_post(GOSSIP_PATH, gossip_handler(agent.mesh.gossip))
    app.router.add_post(FORWARD_PREFIX + "/v1/chat/completions", _forwarded(agent, chat_completions))
    app.router.add_post(FORWARD_PREFIX + "/v1/completions", _forwarded(agent, completions))

    async def load(request: web.Request) -> web.StreamResponse:
        entry = agent.cortex.resolve(await _model_of(request))
        try:
            await agent.neuron.ensure_loaded(entry)
        except errors.HelexaError as e:
            # Only the operator API calls this: the reason a load failed goes back to the operator.
            from helexa.mesh.server.operator_routes import with_load_detail

            raise with_load_detail(agent, entry.id, e) from None
        name = agent.config.name
        return web.json_response({"message": f"{entry.id} is loaded on {name}", "node": name})

    async def unload(request: web.Request) -> web.StreamResponse:
        model = await _model_of(request)
        entry = agent.cortex.catalogue.resolve(model)
        model_id = entry.id if entry is not None else model
        done = await agent.neuron.unload(model_id, reason="operator")
        name = agent.config.name
        message = f"{model_id} unloaded from {name}" if done else f"{model_id} was not loaded on {name}"
        return web.json_response({"message": message, "node": name, "unloaded": done})

    app.router.add_post(LOAD_PATH, load)
    app.router.add_post(UNLOAD_PATH, unload)


class PeerCallError(Exception):
    """A peer call failed: `status` 0 when the peer could not be reached; `body` is its answer."""

    def __init__(self, status: int, body: bytes, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.body = body


async def call_peer(agent: Agent, node: NodeRecord, path: str, payload: Any) -> dict[str, Any]:
    """POST `payload` to a peer's `path` (signed with the mesh key), waiting as long as it takes (a load)."""
    session = agent.mesh.http
    if session is None:
        raise PeerCallError(0, b"", "the agent is not running")
    body = orjson.dumps(payload)
    headers = {"Content-Type": "application/json"}
    auth = agent.mesh.auth
    if auth is not None:
        headers.update(auth.sign("POST", path, body))
    url = f"{PeerAddr(node.address, node.port).url}{path}"
    timeout = aiohttp.ClientTimeout(total=None, connect=PROXY_CONNECT_TIMEOUT_S)
    try:
        async with session.post(url, data=body, headers=headers, timeout=timeout) as resp:
            data = await resp.read()
            if auth is not None and resp.status != 401:
                auth.verify_response(headers[NONCE_HEADER], resp.status, data, resp.headers)
            if resp.status >= 400:
                raise PeerCallError(resp.status, data, f"HTTP {resp.status}")
            reply = orjson.loads(data)
            return reply if isinstance(reply, dict) else {}
    except PeerCallError:
        raise
    except (aiohttp.ClientError, OSError, TimeoutError, orjson.JSONDecodeError) as e:
        raise PeerCallError(0, b"", f"{type(e).__name__}: {e}") from e
    except Exception as e:  # AuthError and the like: the peer is not one of ours
        raise PeerCallError(0, b"", f"{type(e).__name__}: {e}") from e
