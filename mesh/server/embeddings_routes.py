"""`POST /v1/embeddings`: the handler.

The request path is chat's (`mesh.server.inference`): the body is parsed (`mesh.server.embeddings_wire`),
the client's key checked, the model routed (`cortex.route`). Only a catalogue entry with `task = "embed"`
is an embedding model (any other is a 400 naming `model`, as chat refuses an embedding model). A remote
decision is forwarded as raw bytes to the serving agent's `FORWARD_PREFIX + "/v1/embeddings"`
(`mesh.server.peer_routes`); a local one is acquired (cold-loading if needed, holding an in-flight
reservation so the model is not evicted under the request) and asked to `embed`. Tracked, logged and
measured as `kind=embeddings` (`inference.track`); the tokens read count as prompt tokens.
"""

from __future__ import annotations

from aiohttp import web

from helexa.engine.base import EmbeddingModel
from helexa.mesh.errors import ModelFault
from helexa.mesh.routing.decisions import RemoteDecision
from helexa.mesh.server.appkeys import METRICS
from helexa.mesh.server.embeddings_wire import embeddings_response, parse_embeddings_request
from helexa.mesh.server.inference import Outcome, forward, route, track
from helexa.mesh.server.middleware import authorize_client, json_body_response

__all__ = ["EMBEDDINGS_PATH", "add_embeddings_routes", "create_embeddings"]

EMBEDDINGS_PATH = "/v1/embeddings"


def add_embeddings_routes(app: web.Application) -> None:
    """Register `POST /v1/embeddings` (the peer route is `mesh.server.peer_routes`'s)."""
    app.router.add_post(EMBEDDINGS_PATH, create_embeddings)


async def create_embeddings(request: web.Request) -> web.StreamResponse:
    return await track(request, "embeddings", _serve)


async def _serve(request: web.Request, outcome: Outcome) -> web.StreamResponse:
    authorize_client(request)
    body = await request.read()
    job = parse_embeddings_request(body)
    decision = route(request, job.model, outcome, task="embed")
    if isinstance(decision, RemoteDecision):
        return await forward(request, decision, body, outcome)
    async with decision.acquire() as model:
        if not isinstance(model, EmbeddingModel):
            raise ModelFault(f"the model '{decision.entry.id}' was loaded without an embedding path")
        result = await model.embed(job.inputs, dimensions=job.dimensions)
    if len(result.vectors) != len(job.inputs):
        raise ModelFault("the model returned a vector count that does not match the inputs")
    outcome.prompt_tokens = result.prompt_tokens
    request.app[METRICS].add_tokens(model=decision.entry.id, prompt=result.prompt_tokens, completion=0)
    return json_body_response(
        embeddings_response(
            model=decision.entry.id,
            vectors=result.vectors,
            encoding_format=job.encoding_format,
            prompt_tokens=result.prompt_tokens,
        )
    )
