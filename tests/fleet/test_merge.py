"""merge: a join (commutative, associative, idempotent); diff/digest make two views equal."""

from __future__ import annotations

import dataclasses

from hypothesis import given
from hypothesis import strategies as st

from helexa.catalogue.entry import ModelEntry
from helexa.catalogue.store import entry_to_dict
from helexa.mesh.fleet.merge import (
    apply_heartbeats,
    content_hash,
    diff,
    digest,
    members,
    membership_hash,
    merge,
    mesh_catalogue,
    newer,
    newest_entries,
    order_key,
)
from helexa.mesh.fleet.records import NodeId, NodeRecord
from tests.helpers.strategies import SHARED_MACHINE, model_entries, views, wire_node_records


@given(views(), views())
def test_commutative(a, b):
    assert merge(a, b) == merge(b, a)


@given(views(), views(), views())
def test_associative(a, b, c):
    assert merge(merge(a, b), c) == merge(a, merge(b, c))


@given(views(), views())
def test_idempotent(a, b):
    assert merge(a, a) == a
    ab = merge(a, b)
    assert merge(ab, b) == ab


@given(wire_node_records(), wire_node_records())
def test_newer_wins(a, b):
    b = dataclasses.replace(b, node_id=a.node_id)
    w = newer(a, b)
    assert order_key(w) == max(order_key(a), order_key(b))
    assert newer(b, a) == w


@given(views(), views())
def test_diff_exchange_converges(a, b):
    """One push-pull exchange through digests leaves both sides with the merge of both."""
    a, b = dict(a), dict(b)
    expected = merge(a, b)
    to_a = diff(b, digest(a))  # B answers A's digest
    for r in to_a.records:
        a[r.node_id] = newer(a[r.node_id], r) if r.node_id in a else r
    apply_heartbeats(a, to_a.heartbeats)
    # A sends what B wanted (ids where A was ahead)
    back = diff({nid: a[nid] for nid in to_a.wanted}, digest(b))
    for r in back.records:
        b[r.node_id] = newer(b[r.node_id], r) if r.node_id in b else r
    apply_heartbeats(b, back.heartbeats)
    assert digest(a) == digest(b) == digest(expected)


def _rec(nid: str, gen: int, ver: int, hb: int) -> NodeRecord:
    return NodeRecord(
        node_id=NodeId(nid), name=nid, generation=gen, version=ver, heartbeat=hb, address="a", port=1
    )


def test_new_generation_beats_any_version():
    old = _rec("n", 1, 99, 99)
    new = _rec("n", 2, 0, 0)
    assert newer(old, new) is new


def test_diff_sends_heartbeat_only_when_only_heartbeat_behind():
    mine = {NodeId("n"): _rec("n", 1, 2, 10)}
    d = diff(mine, {NodeId("n"): (1, 2, 7)})
    assert d.records == () and d.heartbeats == (("n", 1, 2, 10),) and d.wanted == ()
    d = diff(mine, {NodeId("n"): (1, 1, 70)})
    assert [r.node_id for r in d.records] == ["n"]
    d = diff(mine, {NodeId("n"): (1, 3, 0), NodeId("x"): (5, 0, 0)})
    assert d.records == () and set(d.wanted) == {"n", "x"}


@given(st.lists(wire_node_records(), max_size=5))
def test_mesh_catalogue_picks_newest_version_deterministically(records):
    cat = mesh_catalogue(records)
    assert cat == mesh_catalogue(list(reversed(records)))
    ids = [str(e["id"]) for e in cat]
    assert ids == sorted(set(ids))
    for e in cat:
        versions = [x["version"] for r in records for x in r.catalogue if x["id"] == e["id"]]
        assert e["version"] == max(versions)
        assert e.get("removed") is not True


@given(views())
def test_membership_hash_is_independent_of_order_and_heartbeats(view):
    ms = members(view)
    assert [nid for nid, _ in ms] == sorted(view)
    shuffled = dict(reversed(list(view.items())))
    bumped = {
        nid: dataclasses.replace(r, heartbeat=r.heartbeat + 7, version=r.version + 1)
        for nid, r in view.items()
    }
    assert membership_hash(members(shuffled)) == membership_hash(ms) == membership_hash(members(bumped))


def test_membership_hash_sees_generation_and_nodes():
    a = {NodeId("a"): _rec("a", 1, 1, 1), NodeId("b"): _rec("b", 1, 1, 1)}
    h = membership_hash(members(a))
    assert membership_hash(members({**a, NodeId("b"): _rec("b", 2, 0, 0)})) != h
    assert membership_hash(members({NodeId("a"): a[NodeId("a")]})) != h
    assert len(h) == 12


@given(wire_node_records())
def test_content_hash_ignores_only_the_heartbeat(r):
    assert content_hash(dataclasses.replace(r, heartbeat=r.heartbeat + 1)) == content_hash(r)
    assert content_hash(dataclasses.replace(r, name=r.name + "x")) != content_hash(r)
    assert len(content_hash(r)) == 8


# --- the catalogue merge (`newest_entries`): the one function the mesh-wide catalogue comes from --------

_small_entries = st.lists(
    model_entries(ids=st.sampled_from(["a", "b", "c"]), versions=st.integers(1, 3)), max_size=5
)


def _holding(entries: list[dict[str, object]]) -> NodeRecord:
    """A node record whose catalogue holds `entries` (gossip form)."""
    return NodeRecord(
        node_id=NodeId("n"),
        name="n",
        generation=1,
        version=1,
        heartbeat=0,
        address="10.0.0.1",
        port=1,
        catalogue=tuple(entries),
    )


def _node(entries: list[ModelEntry]) -> NodeRecord:
    return _holding([entry_to_dict(e) for e in entries])


def _merged(newest: dict[str, dict[str, object]]) -> NodeRecord:
    return _holding(list(newest.values()))


@SHARED_MACHINE
@given(_small_entries, _small_entries, _small_entries)
def test_catalogue_merge_is_commutative_associative_idempotent(a, b, c) -> None:
    na, nb, nc = _node(a), _node(b), _node(c)
    assert newest_entries([na, nb]) == newest_entries([nb, na])
    assert newest_entries([_merged(newest_entries([na, nb])), nc]) == newest_entries(
        [na, _merged(newest_entries([nb, nc]))]
    )
    assert newest_entries([na, na]) == newest_entries([na])
    assert newest_entries([_merged(newest_entries([na]))]) == newest_entries([na])


@SHARED_MACHINE
@given(_small_entries, _small_entries)
def test_catalogue_merge_keeps_the_highest_version_per_id(a, b) -> None:
    merged = newest_entries([_node(a), _node(b)])
    assert sorted(merged) == sorted({e.id for e in a + b})
    for eid, entry in merged.items():
        assert entry["version"] == max(e.version for e in a + b if e.id == eid)
        assert entry in [entry_to_dict(e) for e in a + b]
