"""The catalogue's `task` field: `embed` validates and survives the gossip dict round trip; a bad task,
or embed on the mlc engine, is an error naming `task`."""

from __future__ import annotations

from helexa.catalogue.store import entry_from_dict, entry_to_dict
from helexa.catalogue.validate import parse_entry


def test_embed_task_round_trips() -> None:
    raw = {"id": "org/enc", "source": "org/enc", "task": "embed", "memory_mb": 300}
    entry, problems = parse_entry(raw, file="t", index=1, base_dir=None)
    assert entry is not None and not problems and entry.task == "embed"
    out = entry_to_dict(entry)
    assert out["task"] == "embed" and entry_from_dict(out) == entry
    chat, _ = parse_entry({"id": "org/c", "source": "org/c"}, file="t", index=1, base_dir=None)
    assert chat is not None and chat.task == "generate" and "task" not in entry_to_dict(chat)


def test_bad_tasks_name_the_field() -> None:
    for raw in (
        {"id": "a/b", "source": "a/b", "task": "rerank"},
        {"id": "a/b", "source": "a/b", "task": "embed", "engine": "mlc"},
    ):
        entry, problems = parse_entry(raw, file="t", index=1, base_dir=None)
        assert entry is None and [p.field for p in problems if p.severity == "error"] == ["task"]
