"""This agent's identity: a node id stable across restarts and a generation new at every start.

The node id lives in `<state_dir>/node-id`, created once, atomically (a temporary file hard-linked into
place, so two agents racing on one state directory agree on one id and nobody reads a half-written
file). The generation is the start time in milliseconds since the epoch, forced strictly above the last
one recorded in `<state_dir>/generation`, so peers can tell a restart from stale news even when the
clock steps backwards.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from helexa.mesh.fleet.records import NodeId

log = logging.getLogger(__name__)

NODE_ID_FILE = "node-id"
GENERATION_FILE = "generation"


@dataclass(frozen=True, kw_only=True, slots=True)
class Identity:
    node_id: NodeId
    generation: int  # ms since the epoch at this start; grows at every start


def _write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` (write a temporary file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with tmp.open("w", encoding="ascii") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_node_id(path: Path) -> NodeId | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        log.warning("cannot read node id from %s (%s); making a new one", path, e)
        return None
    if not text or len(text) > 64 or not all(c.isalnum() or c == "-" for c in text):
        log.warning("node id file %s is malformed; making a new one", path)
        return None
    return NodeId(text)


def load_node_id(state_dir: Path) -> NodeId:
    """Read the node id from the state directory, creating it (once, atomically) if absent."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / NODE_ID_FILE
    malformed = path.exists()
    existing = _read_node_id(path)
    if existing is not None:
        return existing
    new_id = NodeId(uuid.uuid4().hex)
    tmp = path.with_name(f".{NODE_ID_FILE}.{os.getpid()}.{new_id[:8]}.tmp")
    tmp.write_text(new_id + "\n", encoding="ascii")
    try:
        if malformed:
            os.replace(tmp, path)
        else:
            # link() fails if another agent created the file first: then theirs wins.
            os.link(tmp, path)
    except FileExistsError:
        winner = _read_node_id(path)
        if winner is not None:
            return winner
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("created node id %s in %s", new_id, path)
    return new_id


def next_generation(state_dir: Path, *, now_ms: int | None = None) -> int:
    """Ms since the epoch now, strictly greater than the last generation recorded; records it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / GENERATION_FILE
    current = int(time.time() * 1000) if now_ms is None else now_ms
    previous = 0
    try:
        previous = int(path.read_text(encoding="ascii").strip())
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable %s (%s)", path, e)
    generation = max(current, previous + 1)
    _write_atomic(path, f"{generation}\n")
    return generation


def load_identity(state_dir: Path, *, now_ms: int | None = None) -> Identity:
    """The node id (stable) and a fresh generation. Blocking file I/O: call off the event loop."""
    return Identity(node_id=load_node_id(state_dir), generation=next_generation(state_dir, now_ms=now_ms))
