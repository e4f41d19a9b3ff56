"""The client side of the peer API, and the paths and headers agents speak to each other.

    POST /mesh/peer/gossip                 a gossip exchange (`mesh.gossip.transport`)
    POST /mesh/peer/v1/...                 forwarded inference (`FORWARD_PREFIX` + the client's path),
                                           marked with `FORWARDED_HEADER`: served there, never routed again
    POST /mesh/peer/load    {"model"}      load on that node; answered once loaded
    POST /mesh/peer/unload  {"model"}      unload from that node
    POST /mesh/peer/hello   {}             nothing but a signed reply: the peer proves it holds the key

`call_peer` makes the load/unload calls and `proves_membership` the hello (signed, bound to the node the
record names: `mesh.gossip.auth`); the server side is `mesh.server.peer_routes`.

A forwarded non-streamed request may ask for a deferred answer (`DEFERRED_HEADER: 1`): the serving agent
then answers at once with `200` and `DEFERRED_HEADER: 1`, sends a space every keep-alive interval while it
works, then one line of JSON `{"status": ..., "headers": {...}}` and the real response body. The entry
agent buffers it and answers its client with the real status (`mesh.routing.proxy`): the hop is never
silent, so a stall timeout bounds it (a frozen peer is found in seconds, not after 15 minutes).
"""

from __future__ import annotations

import logging
from typing import Any, Final

import aiohttp
import orjson

from helexa.mesh.fleet.records import NodeRecord
from helexa.mesh.gossip.auth import NONCE_HEADER, AuthError, MeshAuth, binding, binding_node
from helexa.mesh.gossip.transport import PeerAddr
from helexa.mesh.timing import PROXY_CONNECT_TIMEOUT_S

log = logging.getLogger(__name__)

__all__ = [
    "DEFERRED_HEADER",
    "FORWARDED_HEADER",
    "FORWARD_PREFIX",
    "HELLO_PATH",
    "LOAD_PATH",
    "UNLOAD_PATH",
    "PeerCallError",
    "call_peer",
    "proves_membership",
    "target_of",
]

# Forwarded inference goes under the peer prefix, so the peer-auth middleware covers it.
FORWARD_PREFIX: Final = "/mesh/peer"
# A peer that forwards a request sets this header; the request is then served there, never routed again.
FORWARDED_HEADER: Final = "X-Helexa-Forwarded"
# A non-streamed forward that asks for its answer deferred behind keep-alive spaces (module docstring).
DEFERRED_HEADER: Final = "X-Helexa-Deferred"
LOAD_PATH: Final = "/mesh/peer/load"
UNLOAD_PATH: Final = "/mesh/peer/unload"
HELLO_PATH: Final = "/mesh/peer/hello"


class PeerCallError(Exception):
    """A peer call failed: `status` 0 when the peer could not be reached; `body` is its answer."""

    def __init__(self, status: int, body: bytes, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.body = body


def target_of(node: NodeRecord) -> str:
    """The binding a request to `node` is signed for: its node id and the generation its record says."""
    return binding(node.node_id, node.generation)


async def _post(
    session: aiohttp.ClientSession,
    auth: MeshAuth | None,
    node: NodeRecord,
    path: str,
    body: bytes,
    *,
    client_timeout: aiohttp.ClientTimeout,
) -> tuple[int, bytes]:
    """POST `body` signed for `node`; a peer that restarted since its record was read (a signed challenge
    naming the same node id) gets it once more, bound to its current run. The reply's signature is
    checked (except a 401's): returns (status, body)."""
    url = f"{PeerAddr(node.address, node.port).url}{path}"
    target = target_of(node)
    for attempt in range(2):
        headers = {"Content-Type": "application/json"}
        if auth is not None:
            headers.update(auth.sign("POST", path, body, target=target))
        async with session.post(url, data=body, headers=headers, timeout=client_timeout) as resp:
            data = await resp.read()
            if auth is None:
                return resp.status, data
            nonce = headers[NONCE_HEADER]
            learned = auth.challenge(nonce, resp.status, data, resp.headers) if attempt == 0 else None
            if learned is not None and binding_node(learned) == node.node_id and learned != target:
                target = learned
                continue
            if resp.status != 401:
                node_binding = auth.verify_response(nonce, resp.status, data, resp.headers)
                if binding_node(node_binding) != node.node_id:
                    raise AuthError(f"another agent ({node_binding[:80]}) answers at {node.name}'s address")
            return resp.status, data
    raise AuthError("the peer challenged a request signed for the binding it asked for")


async def call_peer(
    session: aiohttp.ClientSession | None,
    auth: MeshAuth | None,
    node: NodeRecord,
    path: str,
    payload: Any,
) -> dict[str, Any]:
    """POST `payload` to a peer's `path` (signed with the mesh key), waiting as long as it takes (a load).

    `session` is None when the agent is not running (before start, after stop)."""
    if session is None:
        raise PeerCallError(0, b"", "the agent is not running")
    body = orjson.dumps(payload)
    timeout = aiohttp.ClientTimeout(total=None, connect=PROXY_CONNECT_TIMEOUT_S)
    try:
        status, data = await _post(session, auth, node, path, body, client_timeout=timeout)
        if status >= 400:
            raise PeerCallError(status, data, f"HTTP {status}")
        reply = orjson.loads(data)
        return reply if isinstance(reply, dict) else {}
    except PeerCallError:
        raise
    except (aiohttp.ClientError, OSError, TimeoutError, orjson.JSONDecodeError) as e:
        raise PeerCallError(0, b"", f"{type(e).__name__}: {e}") from e
    except Exception as e:  # AuthError and the like: the peer is not one of ours
        raise PeerCallError(0, b"", f"{type(e).__name__}: {e}") from e


async def proves_membership(
    session: aiohttp.ClientSession, auth: MeshAuth, node: NodeRecord, *, timeout_s: float
) -> bool:
    """Whether the agent at `node`'s address is `node` and holds `auth`'s key: a hello signed for it,
    answered with a reply signed for our nonce by that node. Never raises."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        status, _ = await _post(session, auth, node, HELLO_PATH, b"{}", client_timeout=timeout)
    except (aiohttp.ClientError, OSError, TimeoutError, AuthError) as e:
        log.debug(
            "%s (%s) did not prove membership: %s: %s", node.name, node.node_id[:8], type(e).__name__, e
        )
        return False
    return status == 200
