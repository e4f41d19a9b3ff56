"""The operator and fleet API (the dashboard, `helexa status|load|unload|models`).

    GET    /mesh/state                   fleet snapshot (`fleet.codec.state_to_json`; shape in fleet.records)
    GET    /mesh/events                  SSE: joins, leaves, suspect/dead, loads, unloads, evictions
    POST   /mesh/models/load    {"model", "node"?}   placement (or the named node); answers once loaded
    POST   /mesh/models/unload  {"model", "node"?}   from the named node, or from every node holding it
    GET    /mesh/catalogue               the mesh-wide catalogue (`{"object": "list", "data": [...]}`)
    POST   /mesh/catalogue      {entry}  add or update (written to this agent's models.toml, gossiped)
    DELETE /mesh/catalogue/{id}          remove mesh-wide (a tombstone with a higher version)

Successes answer `{"message": ..., ...}`; errors the OpenAI envelope (a catalogue edit the disk refuses:
507 naming the file and the reason, e.g. "no space left on device"). A failed load names the engine's
reason (`Neuron.with_load_detail`: its first line, file paths included, never a traceback); the client API
(`/v1/*`) keeps the generic message. Reads (state, events, catalogue)
read cached state only and are open like `/v1/models`. **With a mesh key, the changing endpoints (load,
unload, catalogue edits) require `Authorization: Bearer <mesh key>`**; without one the mesh is open and
`/mesh/state` says `"open": true`.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import orjson
from aiohttp import web

from helexa.catalogue import placement
from helexa.catalogue.store import CatalogueEditError, CatalogueWriteError, InvalidEntryError, entry_to_dict
from helexa.mesh import errors, sse
from helexa.mesh.agent import AGENT_VERSION, Agent
from helexa.mesh.fleet.codec import dumps, state_to_json
from helexa.mesh.fleet.events import EventBus
from helexa.mesh.fleet.records import NodeRecord
from helexa.mesh.routing.neuron import REFUSAL_CODES
from helexa.mesh.routing.peer_client import LOAD_PATH, UNLOAD_PATH, PeerCallError, call_peer
from helexa.mesh.server.appkeys import AGENT
from helexa.mesh.server.middleware import Handler, bearer_check, json_body_response
from helexa.mesh.timing import EVENT_KEEPALIVE_S

log = logging.getLogger(__name__)

__all__ = ["add_operator_routes", "events_handler", "state"]


def state(agent: Agent) -> dict[str, object]:
    """The `/mesh/state` document from cached state."""
    mesh = agent.mesh
    nodes = agent.fleet.routable_nodes()
    feasible: dict[str, tuple[str, ...]] = {
        str(e.id): placement.feasible_on(e, nodes) for e in agent.catalogue.entries
    }
    return state_to_json(
        mesh=agent.config.mesh,
        open_mesh=mesh.open,
        self_id=agent.identity.node_id,
        agent_version=AGENT_VERSION,
        nodes=mesh.gossip.nodes(),
        catalogue=mesh.gossip.catalogue(),
        feasible_on=feasible,
    )


def _insufficient_storage(message: str) -> errors.HelexaError:
    """507: this agent's disk refused a write (full, read-only). The message names the file: operators
    need to know which disk to free, and this API is theirs (never the client API's)."""
    err = errors.HelexaError(message, code="insufficient_storage")
    err.status = 507
    return err


def _message(text: str, **extra: object) -> web.Response:
    return web.json_response({"message": text, **extra})


def _require_operator(agent: Agent, request: web.Request) -> None:
    """With a mesh key, changing endpoints need `Authorization: Bearer <mesh key>`."""
    key = agent.config.mesh_key
    if agent.mesh.auth is None or not key:
        return
    if bearer_check(request.headers.get("Authorization", ""), (key,)) != "ok":
        raise errors.Unauthorized(
            "this mesh has a key: operator requests need 'Authorization: Bearer <mesh key>'"
        )


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise errors.InvalidRequest("the body must be a JSON object") from None
    if not isinstance(data, dict):
        raise errors.InvalidRequest("the body must be a JSON object")
    return data


def _model_and_node(data: dict[str, Any]) -> tuple[str, str | None]:
    model = data.get("model")
    node = data.get("node")
    if not isinstance(model, str) or not model:
        raise errors.InvalidRequest("'model' is required", param="model")
    if node is not None and (not isinstance(node, str) or not node):
        raise errors.InvalidRequest("'node' must be a node name or id", param="node")
    return model, node


def _node(agent: Agent, name_or_id: str) -> NodeRecord:
    record = agent.fleet.node(name_or_id)
    if record is None or (
        record.node_id != agent.fleet.node_id and record not in agent.fleet.routable_nodes()
    ):
        raise errors.InvalidRequest(f"no live node named '{name_or_id}' in this mesh", param="node")
    return record


def _peer_error(e: PeerCallError, node: NodeRecord) -> errors.HelexaError:
    """A peer's error answer as ours (its envelope's message and code), or 502 when it gave none."""
    try:
        err = orjson.loads(e.body)["error"]
        out = errors.HelexaError(str(err.get("message") or "the node failed"), code=err.get("code"))
        out.status = e.status if e.status >= 400 else 502
        out.type = str(err.get("type") or "server_error")
        return out
    except Exception:
        return errors.UpstreamError(f"the node {node.name} could not be reached ({e})")


async def _call_peer(agent: Agent, node: NodeRecord, path: str, payload: Any) -> dict[str, Any]:
    return await call_peer(agent.mesh.http, agent.mesh.auth, node, path, payload)


async def _load_on(agent: Agent, entry_id: str, node: NodeRecord) -> dict[str, Any]:
    if node.node_id == agent.fleet.node_id:
        try:
            await agent.neuron.ensure_loaded(agent.cortex.resolve(entry_id))
        except errors.HelexaError as e:
            raise agent.neuron.with_load_detail(entry_id, e) from None
        return {"message": f"{entry_id} is loaded on {node.name}", "node": node.name}
    return await _call_peer(agent, node, LOAD_PATH, {"model": entry_id})


async def get_state(request: web.Request) -> web.StreamResponse:
    return json_body_response(orjson.dumps(state(request.app[AGENT])))


async def load(request: web.Request) -> web.StreamResponse:
    agent = request.app[AGENT]
    _require_operator(agent, request)
    model, node_name = _model_and_node(await _json_body(request))
    entry = agent.cortex.resolve(model)
    if node_name is not None:
        candidates = [_node(agent, node_name)]
    else:
        nodes = agent.fleet.routable_nodes()
        for n in nodes:
            m = n.model(entry.id)
            if m is not None and m.status == "loaded":
                return _message(f"{entry.id} is already loaded on {n.name}", node=n.name)
        loading = [n for n in nodes if (m := n.model(entry.id)) is not None and m.status == "loading"]
        candidates = loading or agent.cortex.place(entry, nodes)
        if not candidates:
            raise errors.ModelUnavailable(
                f"The model '{entry.id}' cannot run on any node of the mesh",
                reason="infeasible",
                retry_after_s=None,
            )
    last: errors.HelexaError | None = None
    for node in candidates:
        try:
            reply = await _load_on(agent, entry.id, node)
            return _message(str(reply.get("message", f"{entry.id} loaded")), node=node.name)
        except PeerCallError as e:
            last = _peer_error(e, node)
        except errors.HelexaError as e:
            last = e
        if last.code not in REFUSAL_CODES and last.status != 502:
            break
    assert last is not None
    raise last


async def unload(request: web.Request) -> web.StreamResponse:
    agent = request.app[AGENT]
    _require_operator(agent, request)
    model, node_name = _model_and_node(await _json_body(request))
    entry = agent.cortex.catalogue.resolve(model)
    model_id = entry.id if entry is not None else model
    if node_name is not None:
        targets = [_node(agent, node_name)]
    else:
        targets = [n for n in agent.fleet.routable_nodes() if n.model(model_id) is not None]
        if not targets:
            if entry is None:
                raise errors.ModelNotFound(model)
            return _message(f"{model_id} is not loaded on any node", nodes=[])
    done: list[str] = []
    for node in targets:
        if node.node_id == agent.fleet.node_id:
            if await agent.neuron.unload(model_id, reason="operator"):
                done.append(node.name)
            continue
        try:
            reply = await _call_peer(agent, node, UNLOAD_PATH, {"model": model_id})
            if reply.get("unloaded"):
                done.append(node.name)
        except PeerCallError as e:
            raise _peer_error(e, node) from e
    text = f"{model_id} unloaded from {', '.join(done)}" if done else f"{model_id} was not loaded there"
    return _message(text, nodes=done)


async def get_catalogue(request: web.Request) -> web.StreamResponse:
    agent = request.app[AGENT]
    entries = state(agent)["catalogue"]
    return json_body_response(orjson.dumps({"object": "list", "data": entries}))


async def put_catalogue(request: web.Request) -> web.StreamResponse:
    agent = request.app[AGENT]
    _require_operator(agent, request)
    data = await _json_body(request)
    try:
        entry = await agent.mesh.catalogue.put_entry(data)
    except (InvalidEntryError, CatalogueEditError) as e:
        raise errors.InvalidRequest(f"the entry was refused: {e}") from e
    except CatalogueWriteError as e:
        log.warning("catalogue edit of %s refused: %s", data.get("id"), e)
        raise _insufficient_storage(f"the entry was not saved: {e}") from e
    return _message(f"{entry.id} saved (version {entry.version})", entry=entry_to_dict(entry))


async def delete_catalogue(request: web.Request) -> web.StreamResponse:
    agent = request.app[AGENT]
    _require_operator(agent, request)
    entry_id = request.match_info["id"]
    entry = agent.cortex.catalogue.resolve(entry_id)
    if entry is not None:
        entry_id = entry.id
    try:
        removed = await agent.mesh.catalogue.remove_entry(entry_id)
    except CatalogueWriteError as e:
        log.warning("catalogue removal of %s refused: %s", entry_id, e)
        raise _insufficient_storage(f"the entry was not removed: {e}") from e
    if not removed:
        raise errors.ModelNotFound(entry_id)
    return _message(f"{entry_id} removed from the catalogue")


def events_handler(bus: EventBus, *, keepalive_s: float = EVENT_KEEPALIVE_S) -> Handler:
    """The handler of `GET /mesh/events`: streams the bus as SSE until the client or the bus goes."""

    async def handle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers=sse.EVENTS_HEADERS)
        await resp.prepare(request)
        with bus.subscription() as sub:
            try:
                await resp.write(sse.comment("connected"))
                while True:
                    ev = await sub.get(timeout_s=keepalive_s)
                    if ev is None:
                        if sub.closed:
                            break
                        await resp.write(sse.KEEPALIVE)
                        continue
                    await resp.write(sse.event(dumps(ev.to_json())))
            except (ConnectionResetError, ConnectionError):
                return resp  # the client went away
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return resp

    return handle


def add_operator_routes(
    app: web.Application, bus: EventBus, *, keepalive_s: float = EVENT_KEEPALIVE_S
) -> None:
    """Register the operator and fleet API; `bus` feeds `/mesh/events`."""
    app.router.add_get("/mesh/state", get_state)
    app.router.add_get("/mesh/events", events_handler(bus, keepalive_s=keepalive_s))
    app.router.add_post("/mesh/models/load", load)
    app.router.add_post("/mesh/models/unload", unload)
    app.router.add_get("/mesh/catalogue", get_catalogue)
    app.router.add_post("/mesh/catalogue", put_catalogue)
    app.router.add_delete("/mesh/catalogue/{id:.+}", delete_catalogue)
