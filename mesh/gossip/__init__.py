"""Gossip between agents.

- `exchange`  — `Gossip`: push-pull anti-entropy of node records (compact digests, repair, graceful leave).
- `transport` — `PeerAddr`, `HttpTransport` and `gossip_handler` (`POST /mesh/peer/gossip`),
                `InMemoryNetwork` for tests and the simulation.
- `auth`      — the mesh key: HMAC-signed peer requests (bound to the target agent and run) and replies,
                replay protection, the middleware; the peer key derived from client API keys.
"""
