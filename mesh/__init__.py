"""The agent: config, hardware, discovery, gossip, routing, proxying, HTTP server, CLI.

One module per noun:

- `agent` assembles and runs one agent (`build_app`, `start_agent`, `serve`, `main`);
- `runtime` is its mesh side: gossip + membership (`gossip`, `membership`, `merge`, `codec`), mDNS
  (`discovery`), the event bus (`events`), the mesh-wide catalogue, preloads, graceful leave;
- `fleet` (this node's record and its peers'), `cortex` (routing, `routing` holds its contract), `neuron`
  (the local models);
- `server` (OpenAI routes), `peer_api` (`/mesh/peer/...`, HMAC-checked by `auth`), `operator_api`
  (`/mesh/state`, `/mesh/events`, `/mesh/models/*`, `/mesh/catalogue`), `forwarding` + `proxy` (requests
  served by peers);
- `config`, `identity`, `hardware`, `metrics`, `errors`, `protocol`, `sse`, `timing`, `ops` (the CLI side).
"""
