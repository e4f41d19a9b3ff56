"""The OpenAI-compatible routes of the HTTP edge (thin handlers), plus `/healthz` and `/metrics`.

    app = web.Application(middlewares=[error_middleware], client_max_size=...)   # mesh.server.middleware
    app[CORTEX] = cortex; app[METRICS] = metrics           # mesh.server.appkeys; mesh.assembly sets them
    add_openai_routes(app)                                 # /v1/models, /v1/chat/completions, ...
    web.run_app(app, handler_cancellation=True)            # a client that leaves cancels its handler

The inference endpoints live in `mesh.server.inference`; the wire format in `mesh.server.openai_wire`.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from helexa.mesh.errors import ModelNotFound
from helexa.mesh.metrics import CONTENT_TYPE
from helexa.mesh.server import anthropic_wire, openai_wire
from helexa.mesh.server.anthropic_routes import add_anthropic_routes
from helexa.mesh.server.appkeys import CORTEX, HEALTH, METRICS, NODE_NAME
from helexa.mesh.server.embeddings_routes import add_embeddings_routes
from helexa.mesh.server.inference import OPEN_REQUESTS, OpenRequests, chat_completions, completions
from helexa.mesh.server.middleware import authorize_client, json_body_response

__all__ = ["add_openai_routes"]

ANTHROPIC_VERSION_HEADER = "anthropic-version"


def add_openai_routes(app: web.Application) -> None:
    """Register the client-facing routes (and `/healthz`, `/metrics`) on `app`."""
    if OPEN_REQUESTS not in app:
        app[OPEN_REQUESTS] = OpenRequests()
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{id:.+}", get_model)  # ids contain '/': Qwen/Qwen2.5-7B-Instruct
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    add_embeddings_routes(app)  # /v1/embeddings
    add_anthropic_routes(app)  # /v1/messages, /v1/messages/count_tokens
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)


async def list_models(request: web.Request) -> web.StreamResponse:
    authorize_client(request)
    listings = request.app[CORTEX].list_models()
    if ANTHROPIC_VERSION_HEADER in request.headers:  # an Anthropic client: its shape
        return json_body_response(anthropic_wire.model_list_json(listings))
    return json_body_response(openai_wire.model_list_json(listings))


async def get_model(request: web.Request) -> web.StreamResponse:
    authorize_client(request)
    model_id = request.match_info["id"]
    listing = request.app[CORTEX].get_model(model_id)
    if listing is None:
        raise ModelNotFound(model_id)
    if ANTHROPIC_VERSION_HEADER in request.headers:
        return json_body_response(anthropic_wire.model_json(listing))
    return json_body_response(openai_wire.model_json(listing))


async def healthz(request: web.Request) -> web.StreamResponse:
    """Liveness/readiness from cached state only (never waits on a busy engine)."""
    probe = request.app.get(HEALTH)
    body: dict[str, object] = dict(probe()) if probe is not None else {"status": "ok"}
    body.setdefault("status", "ok")
    body.setdefault("node", request.app.get(NODE_NAME, "local"))
    return json_body_response(orjson.dumps(body), status=503 if body["status"] == "draining" else 200)


async def metrics(request: web.Request) -> web.StreamResponse:
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})
