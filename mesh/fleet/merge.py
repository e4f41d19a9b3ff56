"""Pure functions over fleet views: merge, digest, diff, and the mesh-wide catalogue.

A view maps node ids to the newest record known for each. Records are ordered by `order_key`:
`(generation, version, heartbeat)`, i.e. newer (generation, version) wins, and within one version the
higher heartbeat (the owner bumps the heartbeat every round without a new version, so that liveness
spreads without resending whole records). Two different records under the same triple only come from a
bug or a forger; they are ordered by their encoded bytes so that the merge stays a join of a total order:
commutative, associative and idempotent whatever peers send.

Digest: node id → (generation, version, heartbeat). `diff(mine, their_digest)` says what to send them
(full records where they lack the (generation, version), heartbeat-only updates where only the heartbeat
is behind) and which ids I need from them.

Compact digests (`mesh.gossip`) lean on two summaries: `members(view)`, the view's (node id, generation)
pairs in id order, with `membership_hash` over them (two views with the same hash index their nodes the
same way, so a digest can be a positional vector instead of id-keyed entries), and `content_hash` of a
record without its heartbeat (the periodic repair compares these instead of shipping every record).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import orjson

from helexa.mesh.fleet.codec import node_to_dict
from helexa.mesh.fleet.records import NodeId, NodeRecord

__all__ = [
    "Digest",
    "DigestDiff",
    "DigestEntry",
    "View",
    "apply_heartbeats",
    "content_hash",
    "diff",
    "digest",
    "members",
    "membership_hash",
    "merge",
    "merge_record",
    "mesh_catalogue",
    "newer",
    "order_key",
]

View = Mapping[NodeId, NodeRecord]
DigestEntry = tuple[int, int, int]  # (generation, version, heartbeat)
Digest = Mapping[NodeId, DigestEntry]


def _canonical(obj: object) -> bytes:
    """Encoding independent of dict insertion order, for deterministic tie-breaks."""
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def order_key(r: NodeRecord) -> DigestEntry:
    return (r.generation, r.version, r.heartbeat)


def newer(a: NodeRecord, b: NodeRecord) -> NodeRecord:
    """The greater of two records about the same node (total order, so the choice is symmetric)."""
    ka, kb = order_key(a), order_key(b)
    if ka != kb:
        return a if ka > kb else b
    if a is b or a == b:
        return a
    return a if _canonical(node_to_dict(a)) >= _canonical(node_to_dict(b)) else b


def merge_record(view: dict[NodeId, NodeRecord], record: NodeRecord) -> bool:
    """Merge one record into a mutable view in place; True if the view changed."""
    old = view.get(record.node_id)
    if old is None:
        view[record.node_id] = record
        return True
    win = newer(old, record)
    if win is old:
        return False
    view[record.node_id] = win
    return True


def merge(a: View, b: View) -> dict[NodeId, NodeRecord]:
    """The join of two views: per node id, the newer record."""
    out = dict(a)
    for r in b.values():
        merge_record(out, r)
    return out


def digest(view: View) -> dict[NodeId, DigestEntry]:
    return {nid: order_key(r) for nid, r in view.items()}


@dataclass(frozen=True, kw_only=True, slots=True)
class DigestDiff:
    """What one side sends the other after comparing digests."""

    records: tuple[NodeRecord, ...] = ()  # they lack this (generation, version): the full record
    heartbeats: tuple[tuple[NodeId, int, int, int], ...] = ()  # same (gen, version), their heartbeat behind
    wanted: tuple[NodeId, ...] = ()  # ids where they are ahead of me (or I lack the node)


def diff(mine: View, their_digest: Digest) -> DigestDiff:
    """Compare my view with their digest."""
    records: list[NodeRecord] = []
    heartbeats: list[tuple[NodeId, int, int, int]] = []
    wanted: list[NodeId] = []
    for nid, r in mine.items():
        theirs = their_digest.get(nid)
        mk = order_key(r)
        if theirs is None or theirs[:2] < mk[:2]:
            records.append(r)
        elif theirs[:2] == mk[:2] and theirs[2] < mk[2]:
            heartbeats.append((nid, r.generation, r.version, r.heartbeat))
    for nid, theirs in their_digest.items():
        have = mine.get(nid)
        if have is None or tuple(theirs) > order_key(have):
            wanted.append(nid)
    return DigestDiff(records=tuple(records), heartbeats=tuple(heartbeats), wanted=tuple(wanted))


def apply_heartbeats(
    view: dict[NodeId, NodeRecord], heartbeats: Iterable[tuple[NodeId, int, int, int]]
) -> list[NodeId]:
    """Advance heartbeats where the (generation, version) matches; returns the ids that advanced.

    A heartbeat update for the same (generation, version) is the merge of the identical record with a
    higher heartbeat, so this keeps the view's join semantics.
    """
    changed: list[NodeId] = []
    for nid, gen, ver, hb in heartbeats:
        r = view.get(nid)
        if r is not None and r.generation == gen and r.version == ver and hb > r.heartbeat:
            view[nid] = dataclasses.replace(r, heartbeat=hb)
            changed.append(nid)
    return changed


def members(view: View) -> list[tuple[NodeId, int]]:
    """(node id, generation) of every record, sorted by id: the positions of a compact digest."""
    return sorted((nid, r.generation) for nid, r in view.items())


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii")


def membership_hash(member_list: Iterable[tuple[NodeId, int]]) -> str:
    """72-bit hash (12 characters) of a `members()` list. Equal hashes mean the same nodes at the same
    positions with the same generations: an accidental collision needs ~2^36 distinct views."""
    h = hashlib.blake2b(digest_size=9)
    for nid, gen in member_list:
        h.update(f"{nid}\x00{gen}\x00".encode())
    return _b64(h.digest())


def content_hash(r: NodeRecord) -> str:
    """48-bit hash (8 characters) of a record's content except its heartbeat (which moves every round
    without a new version): two records with equal (generation, version) and different hashes are the
    "bug or forger" case the periodic repair exists for."""
    d = node_to_dict(r)
    del d["heartbeat"]
    return _b64(hashlib.blake2b(_canonical(d), digest_size=6).digest())


def entry_version(e: Mapping[str, object]) -> int:
    """A catalogue entry's version (0 when missing or not an integer)."""
    v = e.get("version", 0)
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def newest_entries(
    records: Iterable[NodeRecord], *, accept: Callable[[Mapping[str, object]], bool] | None = None
) -> dict[str, dict[str, object]]:
    """The one catalogue merge: per entry id the newest version among `records`' catalogues, tombstones
    (`"removed": true`) included. With `accept`, only among the entries it accepts: one it refuses (an
    agent's own rules, `mesh.fleet.catalogue.MeshCatalogue.accepts`) never hides an older one it accepts.

    Ties on version with different content are broken by the encoded bytes (the same winner on every
    agent), so the result does not depend on the order of `records`.
    """
    found: dict[str, list[tuple[int, bytes, Mapping[str, object]]]] = {}
    for r in records:
        for e in r.catalogue:
            eid = e.get("id")
            if isinstance(eid, str):
                found.setdefault(eid, []).append((entry_version(e), _canonical(e), e))
    out: dict[str, dict[str, object]] = {}
    for eid, candidates in found.items():
        candidates.sort(key=lambda c: c[:2], reverse=True)
        for _version, _bytes, entry in candidates:
            if accept is None or accept(entry):
                out[eid] = dict(entry)
                break
    return out


def mesh_catalogue(
    records: Iterable[NodeRecord], *, accept: Callable[[Mapping[str, object]], bool] | None = None
) -> list[dict[str, object]]:
    """The mesh-wide catalogue as listed: `newest_entries` without the deletions, sorted by id."""
    newest = newest_entries(records, accept=accept)
    return [newest[k] for k in sorted(newest) if newest[k].get("removed") is not True]
