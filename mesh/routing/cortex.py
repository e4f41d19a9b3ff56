"""The cortex role: `mesh.routing.decisions.Cortex` over the fleet view, the catalogue and the local neuron.

`route()` reads cached state only (the fleet's records, the catalogue in memory) and follows the
routing steps of the mission, in order, so peers slot in without a new structure:

1. loaded on one or more routable nodes → the least busy (in-flight + queued), this node first on ties;
2. loading somewhere → that node (it deduplicates the load; never start a second copy);
3. in the catalogue → `catalogue.placement.place` over the routable nodes: the first candidate;
4. unknown → `ModelNotFound` (404); known but feasible nowhere → `ModelUnavailable` (503, the reason).

A decision for this node is a `LocalDecision` whose `acquire()` is the neuron's reservation (cold-load
single-flight, in-flight counted until exit). A decision for a peer is a `RemoteDecision`; the mesh's
forwarder serves it. A request a peer forwarded is always served here (`forwarded=True`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from helexa.catalogue import placement
from helexa.catalogue.entry import ModelEntry
from helexa.engine.base import LoadedModel, ModelId
from helexa.mesh import errors
from helexa.mesh.fleet.catalogue import CatalogueView
from helexa.mesh.fleet.records import ModelRecord, NodeId, NodeRecord
from helexa.mesh.fleet.view import Fleet
from helexa.mesh.routing.decisions import Decision, Location, ModelListing, RemoteDecision
from helexa.mesh.routing.neuron import DRAINING_CODE, Neuron
from helexa.mesh.timing import DEFAULT_RETRY_AFTER_S

log = logging.getLogger(__name__)

# The name `_infeasible_reason` gives nodes while asking `placement` why a model cannot run there, then
# rewrites: the reasons reach clients, which are never told hostnames.
_UNNAMED = "\x00"
# Order of "best" status over a model's locations, for `/v1/models`.
_STATUS_RANK = {"loaded": 3, "loading": 2, "failed": 1, "unloaded": 0}


@dataclass(frozen=True, kw_only=True, slots=True)
class _Local:
    """Serve here: `acquire()` loads if needed and holds an in-flight reservation."""

    entry: ModelEntry
    neuron: Neuron
    cold: bool = False

    def acquire(self) -> AbstractAsyncContextManager[LoadedModel]:
        return self.neuron.acquire(self.entry)


class MeshCortex:
    """Routing over the fleet view. Every method is synchronous and reads cached state only."""

    def __init__(
        self,
        *,
        fleet: Fleet,
        neuron: Neuron,
        catalogue: CatalogueView,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.fleet = fleet
        self.neuron = neuron
        self.catalogue = catalogue
        self._clock = clock
        self._first_seen: dict[str, int] = {}

    # --- routing -----------------------------------------------------------------------------------

    def resolve(self, model_name: str) -> ModelEntry:
        entry = self.catalogue.resolve(model_name)
        if entry is None:
            raise errors.ModelNotFound(model_name)
        return entry

    def route(self, model_name: str, *, forwarded: bool = False) -> Decision:
        entry = self.resolve(model_name)
        me = self.fleet.self_record
        if forwarded:
            return _Local(entry=entry, neuron=self.neuron, cold=self.neuron.status(entry.id) != "loaded")
        nodes = self.fleet.routable_nodes()

        # 1. Loaded somewhere: the least busy, this node first on ties, then by node id.
        loaded = [(n, m) for n in nodes if (m := n.model(entry.id)) is not None and m.status == "loaded"]
        if loaded:
            node, _ = min(loaded, key=lambda nm: (_busy(nm[1]), nm[0].node_id != me.node_id, nm[0].node_id))
            return self._decide(entry, node, cold=False)

        # 2. Loading somewhere: join that load (this node first).
        loading = [n for n in nodes if (m := n.model(entry.id)) is not None and m.status == "loading"]
        if loading:
            node = min(loading, key=lambda n: (n.node_id != me.node_id, n.node_id))
            return self._decide(entry, node, cold=True)

        if not nodes:
            # Only this node, and it is draining: a transient condition, never a 404.
            raise errors.ModelUnavailable(
                "this agent is shutting down and knows no other node", reason="draining", retry_after_s=1.0
            )

        # 3. In the catalogue: place it.
        candidates = self.place(entry, nodes)
        if not candidates:
            draining = self._draining_could_serve(entry)
            if draining:
                # Only nodes on their way out could run it (pinned there, or the only ones big enough): a
                # transient condition, answered with Retry-After (a restarted node serves it again).
                raise errors.ModelUnavailable(
                    f"The model '{entry.id}' can only run on "
                    f"{'a node that is' if len(draining) == 1 else f'{len(draining)} nodes that are'}"
                    " shutting down",
                    reason="draining",
                    retry_after_s=DEFAULT_RETRY_AFTER_S,
                    code=DRAINING_CODE,
                )
            raise errors.ModelUnavailable(
                self._infeasible_reason(entry, nodes), reason="infeasible", retry_after_s=None
            )
        return self._decide(entry, candidates[0], cold=True, candidates=tuple(candidates[1:]))

    def _draining_could_serve(self, entry: ModelEntry) -> list[str]:
        """Names of live nodes that are draining (this one included) where `entry` could otherwise run."""
        me = self.fleet.live_record
        draining = [me] if me.draining and not me.left else []
        for peer in self.fleet.peers.values():
            if peer.draining and not peer.left and self.fleet.liveness(peer.node_id) in ("alive", "suspect"):
                draining.append(peer)
        if not draining:
            return []
        as_if_up = [dataclasses.replace(n, draining=False) for n in draining]
        by_id = {n.node_id: n.name for n in as_if_up}
        return [by_id[NodeId(i)] for i in placement.place(entry, as_if_up, routable=by_id.keys())]

    def _decide(
        self, entry: ModelEntry, node: NodeRecord, *, cold: bool, candidates: tuple[NodeRecord, ...] = ()
    ) -> Decision:
        if node.node_id == self.fleet.node_id:
            return _Local(entry=entry, neuron=self.neuron, cold=cold)
        return RemoteDecision(entry=entry, node=node, cold=cold, candidates=candidates)

    def place(self, entry: ModelEntry, nodes: Sequence[NodeRecord]) -> list[NodeRecord]:
        """Nodes to ask to load `entry`, best first (`catalogue.placement.place`; deterministic)."""
        by_id = {n.node_id: n for n in nodes}
        return [by_id[NodeId(i)] for i in placement.place(entry, nodes, routable=by_id.keys()) if i in by_id]

    def _feasible_on(self, entry: ModelEntry, nodes: Sequence[NodeRecord]) -> tuple[str, ...]:
        return placement.feasible_on(entry, nodes)

    def _infeasible_reason(self, entry: ModelEntry, nodes: Sequence[NodeRecord]) -> str:
        """Why `entry` runs nowhere, for the client: the reasons without node names (`mesh.errors`
        promises client messages carry no internal hostnames), the same reason counted once."""
        if not nodes:
            return f"The model '{entry.id}' cannot be served now: no node is available (this one is draining)"
        if entry.pinned_on:
            names = {n.name for n in nodes} | {n.node_id for n in nodes}
            if not names & set(entry.pinned_on):
                count = len(entry.pinned_on)
                where = "a node that is" if count == 1 else f"{count} nodes, none of which is"
                return f"The model '{entry.id}' is pinned on {where} available"
        counted: dict[str, int] = {}
        for node in nodes:
            reason = placement.infeasible_reason(entry, dataclasses.replace(node, name=_UNNAMED))
            if reason is not None:
                reason = reason.replace(f"node {_UNNAMED}", "the node").replace(_UNNAMED, "the node")
                counted[reason] = counted.get(reason, 0) + 1
        reasons = [r if n == 1 else f"{r} ({n} nodes like this)" for r, n in counted.items()]
        detail = f": {'; '.join(reasons)}" if reasons else ""
        return f"The model '{entry.id}' cannot run on any node of the mesh{detail}"

    # --- listing -----------------------------------------------------------------------------------

    def _created(self, model_id: str) -> int:
        if model_id not in self._first_seen:
            self._first_seen[model_id] = int(self._clock())
        return self._first_seen[model_id]

    def _listing(
        self, entry: ModelEntry | None, model_id: ModelId, nodes: Sequence[NodeRecord]
    ) -> ModelListing:
        locations: list[Location] = []
        for node in nodes:
            record = node.model(model_id)
            if record is not None:
                locations.append(
                    Location(
                        node=node.node_id,
                        node_name=node.name,
                        status=record.status,
                        memory_mb=record.memory_mb,
                        in_flight=record.in_flight,
                    )
                )
        status = "unloaded"
        for loc in locations:
            s = "unloaded" if loc.status == "unloading" else loc.status
            if _STATUS_RANK[s] > _STATUS_RANK[status]:
                status = s
        feasible = self._feasible_on(entry, nodes) if entry is not None else ()
        owner = model_id.split("/", 1)[0] if "/" in model_id else "helexa"
        return ModelListing(
            id=model_id,
            created=self._created(model_id),
            owned_by=owner,
            status=status,
            feasible_on=feasible,
            locations=tuple(locations),
            aliases=entry.aliases if entry is not None else (),
            entry=entry,
        )

    def list_models(self) -> Sequence[ModelListing]:
        """Every catalogue model feasible on some routable node, plus every model present anywhere."""
        nodes = self.fleet.routable_nodes()
        out: list[ModelListing] = []
        seen: set[str] = set()
        for entry in self.catalogue.entries:
            listing = self._listing(entry, entry.id, nodes)
            if listing.feasible_on or listing.locations:
                out.append(listing)
                seen.add(entry.id)
        for node in nodes:
            for record in node.models:
                if record.id not in seen:
                    seen.add(record.id)
                    out.append(self._listing(self.catalogue.resolve(record.id), record.id, nodes))
        return out

    def get_model(self, model_name: str) -> ModelListing | None:
        entry = self.catalogue.resolve(model_name)
        model_id = entry.id if entry is not None else ModelId(model_name)
        for listing in self.list_models():
            if listing.id == model_id:
                return listing
        return None


def _busy(record: ModelRecord) -> int:
    return record.in_flight + record.queued
