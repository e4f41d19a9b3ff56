"""The agent (`helexa.mesh`): one room per part of it; imports point down this list, never up.

Composition and process (the top):
- `process`   — `helexa agent`: bind first, assemble, serve, signals, drain, `main`; `start_agent` for tests.
- `assembly`  — the one composition root: `build_agent` wires every part, `make_app` the aiohttp app.
- `cli/`      — the `helexa` dispatcher (`cli.main`) and the operator commands (`cli.ops`).
- `client`    — the HTTP client of an agent's API, used by the CLI and the dashboard (`tui`).

The HTTP edge:
- `server/`   — app keys, middleware (errors in one envelope, the one bearer check), the OpenAI wire
                format and routes, the inference request path, the operator and peer routes.

One running agent and its mesh side:
- `agent`     — `Agent`: the parts of one running agent, its health and its drain.
- `peering`   — `MeshRuntime`: the gossip loop, seeds and mDNS, peer events, logs and metrics, catalogue
                refresh, preload, graceful leave.

Who serves a request, and what this agent knows:
- `routing/`  — decisions (the edge's contract), cortex (route, place, list), neuron (loads, eviction,
                keep-alive), forwarding and the proxy, the peer API's client.
- `gossip/`   — the exchange (push-pull anti-entropy), its transport, mesh-key authentication.
- `fleet/`    — records, their codec and merge, membership (failure detection), the fleet view, the
                event bus, the catalogue and its replication: pure or loop-only, no HTTP.

Leaves (import nothing above them):
- `config`, `identity`, `hardware`, `discovery` (mDNS), `metrics`, `errors`, `sse` (framing), `logs`
  (logging setup, `QuietLog`), `timing` (every named timing and limit, with why).

Subpackage `__init__` files are tables of contents and import nothing, so importing one module never
imports a room's siblings.
"""
