"""The client side of the peer API, and the paths and headers agents speak to each other.

    POST /mesh/peer/gossip                 a gossip exchange (`mesh.gossip.transport`)
    POST /mesh/peer/v1/...                 forwarded inference (`FORWARD_PREFIX` + the client's path),
                                           marked with `FORWARDED_HEADER`: served there, never routed again
    POST /mesh/peer/load    {"model"}      load on that node; answered once loaded
    POST /mesh/peer/unload  {"model"}      unload from that node

`call_peer` makes the load/unload calls (signed with the mesh key when there is one); the server side is
`mesh.server.peer_routes`.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import aiohttp
import orjson

from helexa.mesh.fleet.records import NodeRecord
from helexa.mesh.gossip.auth import NONCE_HEADER, MeshAuth
from helexa.mesh.gossip.transport import PeerAddr
from helexa.mesh.timing import PROXY_CONNECT_TIMEOUT_S

log = logging.getLogger(__name__)

__all__ = [
    "CLIENT_AUTH_HEADER",
    "FORWARDED_HEADER",
    "FORWARD_PREFIX",
    "LOAD_PATH",
    "UNLOAD_PATH",
    "PeerCallError",
    "call_peer",
]

# Forwarded inference goes under the peer prefix, so the peer-auth middleware covers it.
FORWARD_PREFIX: Final = "/mesh/peer"
# A peer that forwards a request sets this header; the request is then served there, never routed again.
FORWARDED_HEADER: Final = "X-Helexa-Forwarded"
# Open mesh only: the client's `Authorization`, carried for the serving agent to check against its keys.
CLIENT_AUTH_HEADER: Final = "X-Helexa-Client-Authorization"
LOAD_PATH: Final = "/mesh/peer/load"
UNLOAD_PATH: Final = "/mesh/peer/unload"


class PeerCallError(Exception):
    """A peer call failed: `status` 0 when the peer could not be reached; `body` is its answer."""

    def __init__(self, status: int, body: bytes, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.body = body


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
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers.update(auth.sign("POST", path, body))
    url = f"{PeerAddr(node.address, node.port).url}{path}"
    timeout = aiohttp.ClientTimeout(total=None, connect=PROXY_CONNECT_TIMEOUT_S)
    try:
        async with session.post(url, data=body, headers=headers, timeout=timeout) as resp:
            data = await resp.read()
            if auth is not None and resp.status != 401:
                auth.verify_response(headers[NONCE_HEADER], resp.status, data, resp.headers)
            if resp.status >= 400:
                raise PeerCallError(resp.status, data, f"HTTP {resp.status}")
            reply = orjson.loads(data)
            return reply if isinstance(reply, dict) else {}
    except PeerCallError:
        raise
    except (aiohttp.ClientError, OSError, TimeoutError, orjson.JSONDecodeError) as e:
        raise PeerCallError(0, b"", f"{type(e).__name__}: {e}") from e
    except Exception as e:  # AuthError and the like: the peer is not one of ours
        raise PeerCallError(0, b"", f"{type(e).__name__}: {e}") from e
