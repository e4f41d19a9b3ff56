"""What this agent knows about the fleet: pure data and functions, or objects that live on the event loop
(no HTTP, no threads).

- `records`    — `NodeRecord`, `DeviceRecord`, `ModelRecord`: what each agent publishes about itself.
- `codec`      — records to and from JSON (hostile input bounded and validated); the `/mesh/state` document.
- `merge`      — pure merges: newer (generation, version) wins; digests and their diffs; the one catalogue
                 merge (`newest_entries`, `mesh_catalogue`).
- `membership` — `FailureDetector`: alive → suspect → dead → forgotten from heartbeats.
- `view`       — `Fleet`: this node's own record (rebuilt on change) and its peers' records.
- `events`     — `EventBus` and the events behind `/mesh/events`.
- `catalogue`  — `LocalCatalogue` (this node's entries and file), `CatalogueView` (what routing reads),
                 `MeshCatalogue` (replication between them and the mesh).
"""
