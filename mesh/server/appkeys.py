"""Typed application state (`web.AppKey`s) of the agent's aiohttp app, declared in one place.

The composition root (`mesh.assembly`) sets them; the handlers in `mesh.server` read them
(`request.app[KEY]`), never closing over the agent. Only `CORTEX` and `METRICS` are required by the
OpenAI routes; the operator and peer routes read `AGENT`; every other key has a default when unset.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from helexa.mesh.agent import Agent
from helexa.mesh.metrics import Metrics
from helexa.mesh.routing.decisions import Cortex, RemoteDecision

# The running agent's parts (the operator and peer APIs use its neuron, fleet, mesh and config).
AGENT: web.AppKey[Agent] = web.AppKey("helexa_agent", Agent)

# Serves `/v1/...`: routing decisions and the model list.
CORTEX: web.AppKey[Cortex] = web.AppKey("helexa_cortex")
# Prometheus metrics of this agent (its own registry).
METRICS: web.AppKey[Metrics] = web.AppKey("helexa_metrics", Metrics)
# This agent's node name (the `node` label of request metrics and `/healthz`). Default: "local".
NODE_NAME: web.AppKey[str] = web.AppKey("helexa_node_name", str)

# Forwards a request to the peer a `RemoteDecision` names and returns the (streamed) response
# (`mesh.routing.forwarding.Forwarder`). The body is passed unchanged (raw bytes). Unset: remote
# decisions answer 503.
Forwarder = Callable[[web.Request, RemoteDecision, bytes], Awaitable[web.StreamResponse]]
FORWARDER: web.AppKey[Forwarder] = web.AppKey("helexa_forwarder")

# Client API keys (`Authorization: Bearer <key>`), compared in constant time. Unset or empty: open.
API_KEYS: web.AppKey[tuple[str, ...]] = web.AppKey("helexa_api_keys")

# `/healthz` body from cached state only, e.g. {"status": "ok", "node": "beast", "models": 2}; a
# status of "draining" answers 503 so load balancers stop sending. Unset: {"status": "ok"}.
HealthProbe = Callable[[], Mapping[str, object]]
HEALTH: web.AppKey[HealthProbe] = web.AppKey("helexa_health")

# Seconds between SSE `: keep-alive` comments while a stream waits (default
# `mesh.timing.SSE_KEEPALIVE_INTERVAL_S`).
KEEPALIVE_INTERVAL_S: web.AppKey[float] = web.AppKey("helexa_keepalive_interval_s", float)

# Per-request flag: the client's authorization was already established (a forwarded request from a peer
# that proved the mesh key, or on an open mesh the key derived from the same client API keys: the entry
# agent checked the client's key, which never travels), so `/v1` handlers skip the client API-key check.
CLIENT_AUTHORIZED: web.RequestKey[bool] = web.RequestKey("helexa_client_authorized", bool)
