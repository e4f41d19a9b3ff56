"""Who serves a request.

- `decisions`   — the edge's contract: `Cortex`, `LocalDecision`, `RemoteDecision`, `ModelListing`.
- `cortex`      — `MeshCortex`: route (local, loaded elsewhere, cold-load placement), place, list models.
- `neuron`      — `Neuron`: the local models: single-flight loads, reservations, eviction, keep-alive.
- `forwarding`  — `Forwarder`: serve a remote decision through a peer (retries, avoidance, relays).
- `proxy`       — `forward`: byte-for-byte proxying with connect and stall timeouts, never a total one.
- `peer_client` — the peer API's paths and headers, and `call_peer` for load/unload on a peer.
"""
