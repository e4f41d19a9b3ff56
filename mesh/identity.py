"""This agent's identity: a node id stable across restarts and a generation new at every start.

The node id lives in `<state_dir>/node-id`, created once, atomically (a temporary file hard-linked into
place, so two agents racing on one state directory agree on one id and nobody reads a half-written
file). The generation is the start time in milliseconds since the epoch, forced strictly above the last
one recorded in `<state_dir>/generation`, so peers can tell a restart from stale news even when the
clock steps backwards.

A state directory that cannot be written (a full disk, read-only, no permission) never stops the agent:
with a node id already on disk it is used and the generation just is not recorded; without one the agent
runs under an id made for this run only. Either way a warning names the file and the reason. Temp files
of these writes are named `.<file>.<pid>.<random>.tmp`; ones a killed writer left are removed at start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from helexa.catalogue.store import remove_stale_temp_files
from helexa.mesh.fleet.records import NodeId

log = logging.getLogger(__name__)

NODE_ID_FILE = "node-id"
GENERATION_FILE = "generation"


@dataclass(frozen=True, kw_only=True, slots=True)
class Identity:
    node_id: NodeId
    generation: int  # ms since the epoch at this start; grows at every start
    persisted: bool = True  # False: the node id is this run's only (the state directory is not writable)


def _reason(exc: OSError) -> str:
    """ "no space left on device", "read-only file system", ...: the OS's words, for one log line."""
    text = exc.strerror or str(exc) or type(exc).__name__
    return text[:1].lower() + text[1:]


def _write_temp(path: Path, text: str) -> Path:
    """A new temp file beside `path` holding `text`, fsynced; named for its writer (see the module doc)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("x", encoding="ascii") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return tmp


def _write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` (write a temporary file, fsync, rename). Raises OSError; leaves no temp
    file behind."""
    tmp = _write_temp(path, text)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


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
    """Read the node id from the state directory, creating it (once, atomically) if absent. Raises
    OSError when it must be created and cannot be."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / NODE_ID_FILE
    malformed = path.exists()
    existing = _read_node_id(path)
    if existing is not None:
        return existing
    new_id = NodeId(uuid.uuid4().hex)
    tmp = _write_temp(path, new_id + "\n")
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
    """Ms since the epoch now, strictly greater than the last generation recorded; records it. A record
    that cannot be written is a warning: this start's generation is still above every earlier one."""
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
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, f"{generation}\n")
    except OSError as e:
        log.warning(
            "cannot write %s: %s; generation %d is not recorded (if the clock steps back before the next"
            " start, peers may take that start for old news until the clock passes this one)",
            path,
            _reason(e),
            generation,
        )
    return generation


def load_identity(state_dir: Path, *, now_ms: int | None = None) -> Identity:
    """The node id (stable) and a fresh generation. Blocking file I/O: call off the event loop. Never
    fails for an unwritable state directory (see the module doc)."""
    for name in (NODE_ID_FILE, GENERATION_FILE):
        remove_stale_temp_files(state_dir / name)
    persisted = True
    try:
        node_id = load_node_id(state_dir)
    except OSError as e:
        node_id, persisted = NodeId(uuid.uuid4().hex), False
        log.warning(
            "cannot write %s: %s; running under the node id %s for this run only (after a restart peers"
            " see a new node, and forget this one once it is dead)",
            state_dir / NODE_ID_FILE,
            _reason(e),
            node_id,
        )
    return Identity(
        node_id=node_id, generation=next_generation(state_dir, now_ms=now_ms), persisted=persisted
    )
